//! Reading what a response really used: `usage` from a JSON body or from an SSE stream's
//! usage chunk, and the content deltas of a stream that carries no usage. Pure: fed bytes.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

use super::json_fields::{JsonFields, Path};
use super::sse::{EventSplitter, event_data};
use crate::proxy::request_fields::{Lenient, Text};

/// One SSE event larger than this is not held for parsing: metering stops (the estimate
/// stands) and, when stripping, the stream is passed on as it comes. A JSON answer up to
/// this size is held and read in one pass; a larger one is read by [`JsonFields`] as it
/// streams past (holding nothing), so an answer of any size is metered by its usage.
const MAX_HELD_BYTES: usize = 1 << 20;

/// What is read of a JSON answer.
const ANSWER_FIELDS: &[Path] = &[&["usage"], &["object"], &["id"], &["model"]];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Prompt tokens served from the deployment's prompt cache.
    pub cached_tokens: u64,
}

#[derive(Debug)]
pub struct UsageMeter {
    sse: bool,
    /// Remove the usage the gateway asked for (the usage-only event, `"usage":null` fields).
    strip: bool,
    /// JSON: the answer so far, while it is at most `MAX_HELD_BYTES`...
    pending: Vec<u8>,
    /// ... and past that, its fields, read as the rest streams past.
    scanned: Option<JsonFields>,
    /// SSE: the event being received.
    events: EventSplitter,
    overflow: bool,
    usage: Option<Usage>,
    content_deltas: u64,
    /// The id of the Responses API object the answer carries (JSON: read at `finish`).
    response_id: Option<String>,
    /// The model that answered, as the answer names it.
    model: Option<String>,
}

impl UsageMeter {
    pub fn new(sse: bool, strip: bool) -> Self {
        Self {
            sse,
            strip: sse && strip,
            pending: Vec::new(),
            scanned: None,
            events: EventSplitter::default(),
            overflow: false,
            usage: None,
            content_deltas: 0,
            response_id: None,
            model: None,
        }
    }

    /// Take upstream bytes; return the bytes to send to the client now. Unless stripping,
    /// that is the chunk itself; when stripping, whole events minus what was added.
    pub fn relay(&mut self, chunk: Bytes) -> Bytes {
        if !self.strip {
            self.observe(&chunk);
            return chunk;
        }
        self.events.push(&chunk);
        let mut out = BytesMut::new();
        while let Some(event) = self.events.next_event() {
            if !self.observe_event(&event) {
                without_null_usage(&event, &mut out);
            }
        }
        if self.events.held() > MAX_HELD_BYTES {
            // An event too large to hold: give up stripping and metering, pass it all on.
            self.strip = false;
            self.overflow = true;
            out.extend_from_slice(&self.events.take_rest());
        }
        out.freeze()
    }

    /// Bytes still held when the upstream ends (an unterminated event): metered, and sent on
    /// as they are.
    pub fn flush(&mut self) -> Bytes {
        if !self.sse {
            return Bytes::new();
        }
        let rest = self.events.take_rest();
        if !self.overflow && !rest.is_empty() {
            self.observe_event(&rest);
        }
        if self.strip { rest } else { Bytes::new() }
    }

    fn observe(&mut self, chunk: &[u8]) {
        if self.overflow {
            return;
        }
        if self.sse {
            self.events.push(chunk);
            while let Some(event) = self.events.next_event() {
                self.observe_event(&event);
            }
            if self.events.held() > MAX_HELD_BYTES {
                self.overflow = true;
                self.events.take_rest();
            }
            return;
        }
        if let Some(scanned) = &mut self.scanned {
            scanned.feed(chunk);
            return;
        }
        self.pending.extend_from_slice(chunk);
        if self.pending.len() > MAX_HELD_BYTES {
            let mut scanned = JsonFields::new(ANSWER_FIELDS);
            scanned.feed(&std::mem::take(&mut self.pending));
            self.scanned = Some(scanned);
        }
    }

    /// Read usage and content from one SSE event; true when it is a usage-only event.
    fn observe_event(&mut self, event: &[u8]) -> bool {
        let Some(data) = event_data(event) else {
            return false;
        };
        if data.trim_ascii() == b"[DONE]" {
            return false;
        }
        if self.model.is_some()
            && let Some(deltas) = plain_chunk(&data)
        {
            self.content_deltas += deltas;
            return false;
        }
        // Typed, borrowing reads: only `usage` and the deltas' content are looked at; the
        // rest of the event is skipped without building it.
        let Ok(event) = serde_json::from_slice::<StreamEvent<'_>>(&data) else {
            return false;
        };
        let mut usage_only = false;
        // Azure's first chunk (prompt filter results) names no model: take the first that does.
        if self.model.is_none()
            && let Some(model) = event.model.get().filter(|m| !m.as_str().is_empty())
        {
            self.model = Some(model.as_str().to_owned());
        }
        self.content_deltas += event.content_deltas();
        if let Some(usage) = event.usage {
            self.usage = Some(usage.into());
            usage_only = event.choices.as_ref().is_none_or(|c| c.is_empty());
        }

        // Responses API events: text deltas, and the usage of the final event's response.
        if let Some(response) = event.response {
            if let Some(usage) = response.usage {
                self.usage = Some(usage.into());
            }
            if self.response_id.is_none() {
                self.response_id = response.id;
            }
            if self.model.is_none() {
                self.model = response.model;
            }
        }
        if event.kind.get().map(Text::as_str) == Some("response.output_text.delta")
            && event.delta.get().is_some_and(|d| !d.as_str().is_empty())
        {
            self.content_deltas += 1;
        }
        usage_only
    }

    /// The usage the response reported, if any.
    pub fn finish(&mut self) -> Option<Usage> {
        let unread = !self.sse && self.usage.is_none() && self.response_id.is_none();
        if !unread {
            return self.usage;
        }
        let body = match &mut self.scanned {
            None => serde_json::from_slice::<JsonBody>(&self.pending).ok(),
            Some(scanned) => {
                scanned.finish();
                let read = |path: Path| {
                    scanned
                        .get(path)
                        .and_then(|raw| serde_json::from_str(raw).ok())
                };
                Some(JsonBody {
                    usage: scanned
                        .get(&["usage"])
                        .and_then(|raw| serde_json::from_str::<ReportedUsage>(raw).ok()),
                    object: read(&["object"]),
                    id: read(&["id"]),
                    model: read(&["model"]),
                })
            }
        };
        if let Some(body) = body {
            self.usage = body.usage.map(Usage::from);
            self.model = body.model;
            if body.object.as_deref() == Some("response") {
                self.response_id = body.id;
            }
        }
        self.usage
    }

    /// The Responses API object the answer is (JSON) or streams (its events' `response.id`);
    /// read once [`UsageMeter::finish`] ran.
    pub fn response_id(&self) -> Option<&str> {
        self.response_id.as_deref()
    }

    /// The model the answer names (`model`), read once [`UsageMeter::finish`] ran.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Content pieces streamed so far (about one token each).
    pub fn content_deltas(&self) -> u64 {
        self.content_deltas
    }
}

/// The byte strings the relay looks for in every event, each searcher built once.
struct Needles {
    null_usage_after: Finder<'static>,
    null_usage_before: Finder<'static>,
    kind: Finder<'static>,
    response: Finder<'static>,
    usage: Finder<'static>,
    content: Finder<'static>,
}

fn needles() -> &'static Needles {
    static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
        null_usage_after: Finder::new(b",\"usage\":null"),
        null_usage_before: Finder::new(b"\"usage\":null,"),
        kind: Finder::new(b"\"type\""),
        response: Finder::new(b"\"response\""),
        usage: Finder::new(b"\"usage\""),
        content: Finder::new(b"\"content\""),
    });
    &NEEDLES
}

/// The event, without the `"usage":null` field that asking for usage adds to every chunk,
/// appended to `out`.
fn without_null_usage(event: &[u8], out: &mut BytesMut) {
    let n = needles();
    for field in [&n.null_usage_after, &n.null_usage_before] {
        if let Some(at) = field.find(event) {
            out.extend_from_slice(&event[..at]);
            out.extend_from_slice(&event[at + field.needle().len()..]);
            return;
        }
    }
    out.extend_from_slice(event);
}

/// A chat chunk that carries nothing but content: no usage (or `"usage":null`), no `type`
/// (Responses API events, tool calls) and no `response`. Its non-empty `content` strings are
/// counted where they stand, without parsing the event (the relay's cost per event is
/// mostly this check). `None`: the event needs reading in full.
fn plain_chunk(data: &[u8]) -> Option<u64> {
    let n = needles();
    if n.kind.find(data).is_some() || n.response.find(data).is_some() {
        return None;
    }
    for at in n.usage.find_iter(data) {
        if !value_after_key(data, at + n.usage.needle().len()).starts_with(b"null") {
            return None;
        }
    }
    let deltas = n
        .content
        .find_iter(data)
        .filter(|&at| {
            let value = value_after_key(data, at + n.content.needle().len());
            // A string that is not empty (`""` is no content).
            value.first() == Some(&b'"') && value.get(1).is_some_and(|&b| b != b'"')
        })
        .count();
    Some(deltas as u64)
}

/// What follows a key ending at `end`: past the blanks, the colon and the blanks after it.
fn value_after_key(data: &[u8], end: usize) -> &[u8] {
    let rest = data[end..].trim_ascii_start();
    match rest.strip_prefix(b":") {
        Some(value) => value.trim_ascii_start(),
        None => &[],
    }
}

/// A JSON answer: only its `usage` is read (a `usage` that is not an object reads as none),
/// and what it is (`object`, `id`: a Responses API object is pinned to its member).
#[derive(Deserialize)]
struct JsonBody {
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<ReportedUsage>,
    #[serde(default, deserialize_with = "lenient")]
    object: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    model: Option<String>,
}

/// `usage` as the service writes it (chat and completions: prompt/completion tokens;
/// Responses: input/output tokens); missing counts are 0 (total: their sum).
#[derive(Deserialize)]
struct ReportedUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: u64,
    /// Chat: `prompt_tokens_details`; Responses: `input_tokens_details`.
    #[serde(default, alias = "input_tokens_details", deserialize_with = "lenient")]
    prompt_tokens_details: Option<TokenDetails>,
    total_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct TokenDetails {
    #[serde(default)]
    cached_tokens: u64,
}

impl From<ReportedUsage> for Usage {
    fn from(u: ReportedUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u
                .total_tokens
                .unwrap_or(u.prompt_tokens + u.completion_tokens),
            cached_tokens: u
                .prompt_tokens_details
                .map_or(0, |d| d.cached_tokens.min(u.prompt_tokens)),
        }
    }
}

/// One streamed event: a chat chunk (its `usage` and its choices' content deltas), or a
/// Responses API event (`response.output_text.delta` with its `delta`; the final
/// `response.completed`/`.incomplete`/`.failed` with `response.usage`).
#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<ReportedUsage>,
    #[serde(default, borrow)]
    choices: Option<Vec<StreamChoice<'a>>>,
    #[serde(default, borrow, rename = "type")]
    kind: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    delta: Lenient<Text<'a>>,
    #[serde(default, deserialize_with = "lenient")]
    response: Option<ResponseObject>,
    #[serde(default, borrow)]
    model: Lenient<Text<'a>>,
}

impl StreamEvent<'_> {
    /// Its choices whose delta carries content (an empty string is none).
    fn content_deltas(&self) -> u64 {
        self.choices.as_ref().map_or(0, |choices| {
            choices
                .iter()
                .filter(|c| {
                    c.delta
                        .as_ref()
                        .and_then(|d| d.content.as_deref())
                        .is_some_and(|s| !s.is_empty())
                })
                .count() as u64
        })
    }
}

/// The response object a Responses API event carries: its id and usage are read.
#[derive(Deserialize)]
struct ResponseObject {
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<ReportedUsage>,
    #[serde(default, deserialize_with = "lenient")]
    id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    model: Option<String>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

/// A field of an unexpected shape (`"usage": null`, a string) reads as absent, as the
/// untyped reading did, instead of failing the whole event.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    // Borrowed raw text, read again as `T`: no intermediate `Value` tree to allocate.
    let raw = <&serde_json::value::RawValue>::deserialize(deserializer)?;
    Ok(serde_json::from_str(raw.get()).ok())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn responses_api_usage_is_read_from_json_and_from_the_final_event() {
        let mut json = UsageMeter::new(false, false);
        json.relay(Bytes::from_static(
            br#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":0},"output_tokens":5}}"#,
        ));
        let expected = Usage {
            prompt_tokens: 12,
            completion_tokens: 5,
            total_tokens: 17,
            cached_tokens: 0,
        };
        assert_eq!(json.finish(), Some(expected));

        let mut sse = UsageMeter::new(true, false);
        let events = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\" there\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":12,\"output_tokens\":5,\"total_tokens\":17}}}\n\n",
        );
        let relayed = sse.relay(Bytes::from_static(events.as_bytes()));
        assert_eq!(relayed, events.as_bytes(), "relayed unchanged");
        assert_eq!(sse.content_deltas(), 2);
        assert_eq!(sse.finish(), Some(expected));
    }

    #[test]
    fn json_body_usage_is_read_at_the_end() {
        let mut m = UsageMeter::new(false, false);
        m.relay(Bytes::from_static(br#"{"usage":{"prompt_tokens":9,"#));
        m.relay(Bytes::from_static(
            br#""completion_tokens":5,"total_tokens":14}}"#,
        ));
        assert_eq!(
            m.finish(),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 5,
                total_tokens: 14,
                cached_tokens: 0,
            })
        );
    }

    #[test]
    fn cached_prompt_tokens_are_read_for_chat_and_responses() {
        for body in [
            &br#"{"usage":{"prompt_tokens":2000,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":1920}}}"#[..],
            &br#"{"object":"response","usage":{"input_tokens":2000,"output_tokens":5,"input_tokens_details":{"cached_tokens":1920}}}"#[..],
        ] {
            let mut m = UsageMeter::new(false, false);
            m.relay(Bytes::from_static(body));
            assert_eq!(m.finish().map(|u| u.cached_tokens), Some(1920));
        }
    }

    #[test]
    fn sse_usage_chunk_and_deltas_are_read_across_chunk_boundaries() {
        let mut m = UsageMeter::new(true, false);
        m.relay(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n",
        ));
        m.relay(Bytes::from_static(
            b"\ndata: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\n",
        ));
        m.relay(Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\ndata: [DONE]\n\n"));
        assert_eq!(m.content_deltas(), 1);
        assert_eq!(m.finish().map(|u| u.total_tokens), Some(4));
    }

    #[test]
    fn a_stream_without_usage_reports_none() {
        let mut m = UsageMeter::new(true, false);
        m.relay(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(m.finish(), None);
        assert_eq!(m.content_deltas(), 1);
    }

    #[test]
    fn stripping_removes_exactly_what_asking_for_usage_added() {
        let mut m = UsageMeter::new(true, true);
        let content = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        let with_null = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n";
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n";
        let upstream = format!("{with_null}{usage}data: [DONE]\n\n");
        let (a, b) = upstream.as_bytes().split_at(20);
        let mut out = m.relay(Bytes::copy_from_slice(a)).to_vec();
        out.extend_from_slice(&m.relay(Bytes::copy_from_slice(b)));
        out.extend_from_slice(&m.flush());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{content}data: [DONE]\n\n")
        );
        assert_eq!(m.finish().map(|u| u.total_tokens), Some(4));
    }

    /// An upstream stream framed with `nl`: content events with `"usage":null`, a comment,
    /// an event with two data lines, the usage-only event, `[DONE]`.
    fn stream(nl: &str, pieces: usize) -> (String, String) {
        let mut upstream = format!(": keep-alive{nl}{nl}");
        let mut client = upstream.clone();
        for i in 0..pieces {
            let event = format!(
                "event: chunk{nl}id: {i}{nl}data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]"
            );
            upstream.push_str(&format!("{event},\"usage\":null}}{nl}{nl}"));
            client.push_str(&format!("{event}}}{nl}{nl}"));
        }
        let split = format!(
            "data: {{\"choices\":[{{\"delta\":{nl}data: {{\"content\":\"x\"}}}}]}}{nl}{nl}"
        );
        upstream.push_str(&split);
        client.push_str(&split);
        upstream.push_str(&format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":{},\"total_tokens\":{}}}}}{nl}{nl}",
            pieces + 1,
            pieces + 4
        ));
        let done = format!("data: [DONE]{nl}{nl}");
        upstream.push_str(&done);
        client.push_str(&done);
        (upstream, client)
    }

    /// The content deltas serde counts in one event (the full reading).
    fn parsed_deltas(data: &[u8]) -> u64 {
        let event: StreamEvent<'_> = serde_json::from_slice(data).unwrap();
        event.content_deltas()
    }

    #[test]
    fn a_plain_chunk_is_counted_as_the_full_reading_counts_it_or_read_in_full() {
        let read_in_full = [
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
            r#"{"choices":[], "usage" : { "prompt_tokens":3}}"#,
            r#"{"type":"response.output_text.delta","delta":"Hi"}"#,
            r#"{"response":{"id":"resp_1"}}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"type":"function"}]}}]}"#,
            r#"{"choices":[{"delta":{"content":"usage"}}]}"#,
        ];
        for data in read_in_full {
            assert_eq!(plain_chunk(data.as_bytes()), None, "{data}");
        }
        let counted = [
            r#"{"choices":[{"delta":{"content":"Hi"}}],"usage":null}"#,
            r#"{"choices":[{"delta":{"content":""}}],"usage":null}"#,
            r#"{"choices":[{"delta":{"content":null}}]}"#,
            r#"{"choices":[{"delta":{"role":"assistant","content":"content"}}]}"#,
            r#"{"choices":[{"delta":{"content" : "\"usage\": {1}"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop","content_filter_results":{}}]}"#,
            r#"{"choices":[{"delta":{"content":"x"},"logprobs":{"content":[]}}], "usage": null}"#,
        ];
        for data in counted {
            assert_eq!(
                plain_chunk(data.as_bytes()),
                Some(parsed_deltas(data.as_bytes())),
                "{data}"
            );
        }
    }

    /// Relay `chunks` through a meter; the client's bytes and what was metered.
    fn relay_all(chunks: &[&[u8]], strip: bool) -> (Vec<u8>, Option<Usage>, u64) {
        let mut m = UsageMeter::new(true, strip);
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&m.relay(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&m.flush());
        (out, m.finish(), m.content_deltas())
    }

    #[test]
    fn crlf_events_are_relayed_as_they_complete() {
        let mut m = UsageMeter::new(true, true);
        let (upstream, _) = stream("\r\n", 1_000);
        let mut relayed_during = 0;
        let bytes = upstream.as_bytes();
        for piece in bytes[..bytes.len() - 40].chunks(64) {
            relayed_during += m.relay(Bytes::copy_from_slice(piece)).len();
        }
        assert!(
            relayed_during > bytes.len() / 2,
            "held back: {relayed_during}"
        );
    }

    #[test]
    fn an_event_too_large_to_hold_is_passed_on_not_buffered() {
        let mut m = UsageMeter::new(true, true);
        let mut out = 0;
        let piece = vec![b'x'; 64 * 1024];
        out += m.relay(Bytes::from_static(b"data: ")).len();
        for _ in 0..40 {
            out += m.relay(Bytes::from(piece.clone())).len();
        }
        assert!(out >= 39 * piece.len(), "relayed {out} bytes");
        assert!(m.events.held() == 0);
        assert_eq!(m.finish(), None, "not metered: the estimate stands");
    }

    proptest! {
        /// Any split of a valid stream, in any framing, gives the client the same bytes and
        /// meters the same usage as the whole stream in one chunk.
        #[test]
        fn any_split_in_any_framing_relays_and_meters_the_same(
            nl in prop::sample::select(vec!["\n", "\r\n", "\r"]),
            pieces in 0usize..12,
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            strip in any::<bool>(),
        ) {
            let (upstream, client) = stream(nl, pieces);
            let bytes = upstream.as_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            at.extend([0, bytes.len()]);
            at.sort_unstable();
            at.dedup();
            let chunks: Vec<&[u8]> = at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            let whole = relay_all(&[bytes], strip);
            let split = relay_all(&chunks, strip);
            prop_assert_eq!(&split, &whole);
            let expected = if strip { client.as_bytes() } else { bytes };
            prop_assert_eq!(String::from_utf8_lossy(&split.0), String::from_utf8_lossy(expected));
            prop_assert_eq!(split.1.map(|u| u.total_tokens), Some(pieces as u64 + 4));
            prop_assert_eq!(split.2, pieces as u64 + 1);
        }
    }
}

//! Reading what a response really used: `usage` from a JSON body or from an SSE stream's
//! usage chunk, and the content deltas of a stream that carries no usage. Pure: fed bytes.

use bytes::Bytes;
use serde_json::Value;

/// Bodies larger than this are not kept for parsing; their estimate stands.
const MAX_JSON_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Default)]
pub struct UsageMeter {
    sse: bool,
    /// Remove the usage the gateway asked for (the usage-only event, `"usage":null` fields).
    strip: bool,
    /// SSE: bytes of the event being received; JSON: the body so far.
    pending: Vec<u8>,
    overflow: bool,
    usage: Option<Usage>,
    content_deltas: u64,
}

impl UsageMeter {
    pub fn new(sse: bool, strip: bool) -> Self {
        Self {
            sse,
            strip: sse && strip,
            ..Self::default()
        }
    }

    /// Take upstream bytes; return the bytes to send to the client now. Unless stripping,
    /// that is the chunk itself; when stripping, whole events minus what was added.
    pub fn relay(&mut self, chunk: Bytes) -> Bytes {
        if !self.strip {
            self.observe(&chunk);
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        let mut out = Vec::with_capacity(chunk.len());
        while let Some(end) = find(&self.pending, b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            if !self.observe_event(&event) {
                out.extend_from_slice(&without_null_usage(&event));
            }
        }
        Bytes::from(out)
    }

    /// Bytes still held when the upstream ends (an unterminated event), sent as they are.
    pub fn flush(&mut self) -> Bytes {
        if self.strip {
            Bytes::from(std::mem::take(&mut self.pending))
        } else {
            Bytes::new()
        }
    }

    fn observe(&mut self, chunk: &[u8]) {
        if self.overflow {
            return;
        }
        self.pending.extend_from_slice(chunk);
        if self.sse {
            while let Some(end) = find(&self.pending, b"\n\n") {
                let event: Vec<u8> = self.pending.drain(..end + 2).collect();
                self.observe_event(&event);
            }
        }
        if self.pending.len() > MAX_JSON_BYTES {
            self.overflow = true;
            self.pending = Vec::new();
        }
    }

    /// Read usage and content from one SSE event; true when it is a usage-only event.
    fn observe_event(&mut self, event: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(event) else {
            return false;
        };
        let mut usage_only = false;
        for data in text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
        {
            if data == "[DONE]" {
                continue;
            }
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let choices = value.get("choices").and_then(Value::as_array);
            if let Some(usage) = parse_usage(&value) {
                self.usage = Some(usage);
                usage_only = choices.is_none_or(|c| c.is_empty());
            }
            if let Some(choices) = choices {
                self.content_deltas += choices
                    .iter()
                    .filter(|c| {
                        c.pointer("/delta/content")
                            .and_then(Value::as_str)
                            .is_some_and(|s| !s.is_empty())
                    })
                    .count() as u64;
            }
        }
        usage_only
    }

    /// The usage the response reported, if any.
    pub fn finish(&mut self) -> Option<Usage> {
        if !self.sse && !self.overflow && self.usage.is_none() {
            self.usage = serde_json::from_slice::<Value>(&self.pending)
                .ok()
                .as_ref()
                .and_then(parse_usage);
        }
        self.usage
    }

    /// Content pieces streamed so far (about one token each).
    pub fn content_deltas(&self) -> u64 {
        self.content_deltas
    }
}

/// The event without the `"usage":null` field that asking for usage adds to every chunk.
fn without_null_usage(event: &[u8]) -> Vec<u8> {
    for field in [&b",\"usage\":null"[..], &b"\"usage\":null,"[..]] {
        if let Some(at) = find(event, field) {
            let mut out = event[..at].to_vec();
            out.extend_from_slice(&event[at + field.len()..]);
            return out;
        }
    }
    event.to_vec()
}

fn parse_usage(value: &Value) -> Option<Usage> {
    let usage = value.get("usage")?.as_object()?;
    let get = |k: &str| usage.get(k).and_then(Value::as_u64);
    let prompt_tokens = get("prompt_tokens").unwrap_or(0);
    let completion_tokens = get("completion_tokens").unwrap_or(0);
    let total_tokens = get("total_tokens").unwrap_or(prompt_tokens + completion_tokens);
    Some(Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                total_tokens: 14
            })
        );
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
}

//! Token counts as the service counts them (tiktoken's encodings, o200k for the gpt-4o
//! family, counted by the `tiktoken` crate: the vocabulary in half tiktoken-rs's memory and
//! counts without building the token list), and the up-front estimate a request is charged
//! against budgets before it is sent.

use std::hash::{Hash, Hasher};

use std::ops::ControlFlow;

use serde_json::value::RawValue;

use crate::proxy::request_fields::{
    Content, Message, Part, RequestFields, ResponsesInput, ShapeError, Text, each_message,
    input_tokens as walk_input,
};

pub use crate::config::Encoding;

impl Encoding {
    /// The tokenizer, built on its first use: a replica whose pools use one encoding never
    /// holds the other (each is tens of MiB), and an idle replica holds none.
    fn bpe(self) -> &'static tiktoken::CoreBpe {
        let name = match self {
            Self::O200kBase => "o200k_base",
            Self::Cl100kBase => "cl100k_base",
        };
        tiktoken::get_encoding(name).expect("the encodings are built in (Cargo.toml features)")
    }

    /// Tokens of `text`. Long texts are remembered: a chat client resends its system prompt
    /// and the whole conversation every turn, and tiktoken counts about 45 MB/s (4 KiB of
    /// prompt: ~100 µs; `cargo bench -p spillway-tests --bench estimate`).
    pub fn count(self, text: &str) -> u64 {
        if text.len() < MIN_REMEMBERED_BYTES {
            return self.count_uncached(text);
        }
        let key = CountKey {
            encoding: self,
            len: text.len(),
            hash: {
                let mut hasher = std::hash::DefaultHasher::new();
                text.hash(&mut hasher);
                hasher.finish()
            },
        };
        match counts().get_or_insert_with(&key, || {
            Ok::<_, std::convert::Infallible>(self.count_uncached(text))
        }) {
            Ok(count) => count,
            Err(never) => match never {},
        }
    }

    fn count_uncached(self, text: &str) -> u64 {
        self.bpe().count_with_special_tokens(text) as u64
    }
}

/// Texts shorter than this are counted every time (cheaper than remembering them).
const MIN_REMEMBERED_BYTES: usize = 256;
/// Counts remembered (about 40 bytes each).
const REMEMBERED_COUNTS: usize = 100_000;

/// A text by encoding, length and 64-bit hash: two texts would have to collide on both to
/// share a count, and then only an estimate would be off.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct CountKey {
    encoding: Encoding,
    len: usize,
    hash: u64,
}

fn counts() -> &'static quick_cache::sync::Cache<CountKey, u64> {
    static COUNTS: std::sync::OnceLock<quick_cache::sync::Cache<CountKey, u64>> =
        std::sync::OnceLock::new();
    COUNTS.get_or_init(|| quick_cache::sync::Cache::new(REMEMBERED_COUNTS))
}

/// Texts are counted in pieces of at most this many bytes: a BPE merge keeps state per byte
/// of one piece (tiktoken-rs's ~48 bytes: a 14 MiB word took 670 MB), so a piece bounds it
/// whatever the counter. A cut costs at most a token or two per piece (cut at whitespace
/// where one is near).
const COUNT_PIECE_BYTES: usize = 16 * 1024;

impl Encoding {
    /// Tokens of `text`, counted piece by piece; `None` once the running total passes `limit`.
    fn count_bounded(self, text: &str, mut so_far: u64, limit: u64) -> Option<u64> {
        let start = so_far;
        let mut rest = text;
        while !rest.is_empty() {
            let piece = piece_of(rest, COUNT_PIECE_BYTES);
            so_far = so_far.saturating_add(self.count(piece));
            if so_far > limit {
                return None;
            }
            rest = &rest[piece.len()..];
        }
        Some(so_far - start)
    }
}

/// The first piece of `text`: all of it when short, else at most `max` bytes, cut before
/// the last whitespace in its second half (so words stay whole) or at a char boundary.
fn piece_of(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let boundary_below = |mut at: usize| {
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    let (half, end) = (boundary_below(max / 2), boundary_below(max));
    match text[half..end].rfind(char::is_whitespace) {
        Some(at) if half + at > 0 => &text[..half + at],
        _ => &text[..end],
    }
}

/// A prompt's running count, stopped as soon as it passes `limit` (a consumer's
/// `max_prompt_tokens`): a prompt over it is refused, however much more there is to count.
struct Tally {
    encoding: Encoding,
    total: u64,
    limit: u64,
}

impl Tally {
    fn new(encoding: Encoding, limit: u64) -> Self {
        Self {
            encoding,
            total: 0,
            limit,
        }
    }

    fn add(&mut self, tokens: u64) -> ControlFlow<()> {
        self.total = self.total.saturating_add(tokens);
        if self.total > self.limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn text(&mut self, text: &str) -> ControlFlow<()> {
        match self.encoding.count_bounded(text, self.total, self.limit) {
            Some(n) => self.add(n),
            None => {
                self.total = self.limit.saturating_add(1);
                ControlFlow::Break(())
            }
        }
    }

    /// One message by OpenAI's published rule for the gpt-4o family: 3 per message, its
    /// role and content (and 1 more with a name). Image parts count as an image.
    fn message(&mut self, message: &Message) -> ControlFlow<()> {
        self.add(3)?;
        if let Some(role) = &message.role {
            self.add(role_tokens(self.encoding, role.as_str()))?;
        }
        if let Some(name) = &message.name {
            self.text(name.as_str())?;
            self.add(1)?;
        }
        match &message.content {
            Content::Text(text) => self.text(text),
            // The parts were checked when the message was read.
            content @ Content::Parts(_) => content
                .each_part(|part| match part.kind.get().map(Text::as_str) {
                    // `input_text`/`output_text`/`input_image`: Responses API items.
                    Some("text" | "input_text" | "output_text") => part
                        .text
                        .get()
                        .map_or(ControlFlow::Continue(()), |t| self.text(t.as_str())),
                    Some("image_url" | "input_image") => self.add(image_tokens(part)),
                    _ => ControlFlow::Continue(()),
                })
                .unwrap_or(ControlFlow::Continue(())),
            Content::Absent => ControlFlow::Continue(()),
        }
    }

    /// A list of messages, plus 3 to prime the reply.
    fn messages(&mut self, list: &RawValue, field: &str) -> Result<ControlFlow<()>, ShapeError> {
        if self.add(3).is_break() {
            return Ok(ControlFlow::Break(()));
        }
        each_message(list, field, |message| self.message(message))
    }

    /// An embeddings `input` or completions `prompt`.
    fn input(&mut self, raw: &RawValue) -> Result<ControlFlow<()>, ShapeError> {
        let encoding = self.encoding;
        let (start, limit) = (self.total, self.limit);
        let mut counted = 0u64;
        let tokens = walk_input(raw, &mut |text| {
            let n = encoding.count_bounded(text, start.saturating_add(counted), limit)?;
            counted = counted.saturating_add(n);
            Some(n)
        })?;
        Ok(self.add(tokens))
    }
}

/// Tokens of a message's role. The usual roles come with every message and are counted once
/// per encoding (tiktoken takes ~5k instructions even for one word); others are counted.
fn role_tokens(encoding: Encoding, role: &str) -> u64 {
    const ROLES: [&str; 6] = [
        "system",
        "user",
        "assistant",
        "tool",
        "developer",
        "function",
    ];
    static COUNTS: std::sync::OnceLock<[[u64; ROLES.len()]; 2]> = std::sync::OnceLock::new();
    let Some(at) = ROLES.iter().position(|r| *r == role) else {
        return encoding.count(role);
    };
    let counts = COUNTS.get_or_init(|| {
        [Encoding::O200kBase, Encoding::Cl100kBase]
            .map(|encoding| ROLES.map(|role| encoding.count_uncached(role)))
    });
    let by_encoding = match encoding {
        Encoding::O200kBase => &counts[0],
        Encoding::Cl100kBase => &counts[1],
    };
    by_encoding[at]
}

/// An image part: 85 tokens at low detail; otherwise, with its size unknown, the most a
/// high-detail image can cost (85 + 170 per 512-pixel tile, at most 2048 x 768 = 6 tiles).
fn image_tokens(part: &Part) -> u64 {
    let detail = part.image_url.get().and_then(|i| i.detail.get());
    match detail.map(Text::as_str) {
        Some("low") => 85,
        _ => 85 + 170 * 6,
    }
}

/// Tool and function definitions are sent to the model as text; their JSON without the
/// whitespace between tokens is a conservative count of what they add to the prompt.
fn tool_tokens(tally: &mut Tally, fields: &RequestFields) -> ControlFlow<()> {
    for raw in [fields.tools, fields.functions].into_iter().flatten() {
        if raw.get() != "null" {
            tally.text(&compact_json(raw.get()))?;
        }
    }
    ControlFlow::Continue(())
}

/// Valid JSON text without the whitespace outside its strings (as `Value::to_string` would
/// print it, without building the tree).
fn compact_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if !c.is_ascii_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// What kind of call a request is, read once from its validated operation path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Other,
}

impl Operation {
    /// From the operation's segments (`chat/completions`, `extensions/chat/completions`,
    /// `responses/{id}`, ...).
    pub fn of(segments: &[String]) -> Self {
        let ends = |tail: &[&str]| {
            segments.len() >= tail.len()
                && segments[segments.len() - tail.len()..]
                    .iter()
                    .zip(tail)
                    .all(|(s, t)| s == t)
        };
        if ends(&["chat", "completions"]) {
            Self::ChatCompletions
        } else if ends(&["completions"]) {
            Self::Completions
        } else if ends(&["embeddings"]) {
            Self::Embeddings
        } else if segments.first().is_some_and(|s| s == "responses") {
            Self::Responses
        } else {
            Self::Other
        }
    }
}

/// What a request will cost, decided once in admission: its prompt, and the most output it
/// may generate (all `n` choices).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenEstimate {
    pub prompt: u64,
    pub output: u64,
}

impl TokenEstimate {
    /// What is charged against budgets before the request is sent.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.output)
    }
}

/// Most output a request is charged for: beyond any model's limit (the service refuses such a
/// request), and far from where budget arithmetic could overflow.
pub const MAX_OUTPUT_ESTIMATE: u64 = 10_000_000;

/// What a request is charged before it is sent: prompt plus the most it may generate.
/// Bodies that are not JSON (audio uploads) are charged a rough byte-based share. Counting
/// stops once the prompt passes `prompt_limit` (the estimate is then just over it).
pub fn estimate(
    encoding: Encoding,
    operation: Operation,
    fields: Option<&RequestFields>,
    body_len: usize,
    default_max_tokens: u64,
    prompt_limit: u64,
) -> Result<TokenEstimate, ShapeError> {
    let estimate = uncapped_estimate(
        encoding,
        operation,
        fields,
        body_len,
        default_max_tokens,
        prompt_limit,
    )?;
    Ok(TokenEstimate {
        output: estimate.output.min(MAX_OUTPUT_ESTIMATE),
        ..estimate
    })
}

fn uncapped_estimate(
    encoding: Encoding,
    operation: Operation,
    fields: Option<&RequestFields>,
    body_len: usize,
    default_max_tokens: u64,
    prompt_limit: u64,
) -> Result<TokenEstimate, ShapeError> {
    let by_bytes = TokenEstimate {
        prompt: body_len as u64 / 4,
        output: 0,
    };
    let Some(fields) = fields else {
        return Ok(by_bytes);
    };
    let mut tally = Tally::new(encoding, prompt_limit);
    // `n` choices each generate up to the cap.
    let choices = fields.n.0.unwrap_or(1).max(1);
    Ok(match operation {
        Operation::ChatCompletions => {
            let flow = match fields.messages {
                Some(list) => tally.messages(list, "messages")?,
                None => tally.add(3),
            };
            if flow.is_continue() {
                let _ = tool_tokens(&mut tally, fields);
            }
            TokenEstimate {
                prompt: tally.total,
                output: choices.saturating_mul(fields.output_cap().unwrap_or(default_max_tokens)),
            }
        }
        Operation::Embeddings => {
            if let Some(input) = fields.input {
                let _ = tally.input(input)?;
            }
            TokenEstimate {
                prompt: tally.total,
                output: 0,
            }
        }
        // Legacy completions default to 16 output tokens, as the service does.
        Operation::Completions => {
            if let Some(prompt) = fields.prompt {
                let _ = tally.input(prompt)?;
            }
            TokenEstimate {
                prompt: tally.total,
                output: choices.saturating_mul(fields.output_cap().unwrap_or(16)),
            }
        }
        // Creating a response: its input (text or items, counted as chat messages), its
        // instructions and tools. Other Responses calls (retrieve, cancel) generate nothing.
        Operation::Responses if fields.input.is_some() => {
            responses_prompt(&mut tally, fields)?;
            TokenEstimate {
                prompt: tally.total,
                output: fields.output_cap().unwrap_or(default_max_tokens),
            }
        }
        Operation::Responses | Operation::Other => by_bytes,
    })
}

fn responses_prompt(tally: &mut Tally, fields: &RequestFields) -> Result<(), ShapeError> {
    let flow = match fields.responses_input() {
        Some(ResponsesInput::Text(text)) => {
            let user = role_tokens(tally.encoding, "user");
            match tally.add(3 + 3 + user) {
                ControlFlow::Continue(()) => tally.text(&text),
                stop => stop,
            }
        }
        Some(ResponsesInput::Items(items)) => tally.messages(items, "input")?,
        None => ControlFlow::Continue(()),
    };
    if flow.is_break() {
        return Ok(());
    }
    if let Some(text) = fields.instructions.get() {
        let system = role_tokens(tally.encoding, "system");
        if tally.add(3 + system).is_break() || tally.text(text.as_str()).is_break() {
            return Ok(());
        }
    }
    let _ = tool_tokens(tally, fields);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHAT: Operation = Operation::ChatCompletions;

    fn estimate_of(operation: Operation, body: &serde_json::Value) -> TokenEstimate {
        let text = body.to_string();
        let read = RequestFields::parse(text.as_bytes()).expect("a JSON object");
        estimate(
            Encoding::O200kBase,
            operation,
            Some(&read),
            text.len(),
            256,
            u64::MAX,
        )
        .expect("a valid shape")
    }

    #[test]
    fn remembered_role_counts_are_the_counts() {
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for role in [
                "system",
                "user",
                "assistant",
                "tool",
                "developer",
                "function",
                "critic",
            ] {
                assert_eq!(
                    role_tokens(encoding, role),
                    encoding.count_uncached(role),
                    "{role}"
                );
            }
        }
    }

    #[test]
    fn legacy_completions_and_n_are_split_into_prompt_and_output() {
        let legacy = json!({"prompt": "Hello there", "n": 2});
        assert_eq!(
            estimate_of(Operation::Completions, &legacy),
            TokenEstimate {
                prompt: 2,
                output: 32
            },
            "16 output tokens per choice by default, as the service"
        );
        let segments = |p: &str| p.split('/').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            Operation::of(&segments("extensions/chat/completions")),
            CHAT
        );
        assert_eq!(
            Operation::of(&segments("responses/resp_1/input_items")),
            Operation::Responses
        );
    }

    #[test]
    fn responses_requests_count_input_instructions_and_the_output_cap() {
        let responses = Operation::Responses;
        // Text input is one user message: the same as the chat request with that message.
        let text = json!({"model": "gpt-4o", "input": "Hello there", "max_output_tokens": 7});
        let chat =
            json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 7});
        assert_eq!(estimate_of(responses, &text), estimate_of(CHAT, &chat));
        // Items with input_text parts, plus instructions (a system message).
        let items = json!({"model": "gpt-4o", "instructions": "Be brief.",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}]});
        let chat = json!({"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"}]});
        assert_eq!(estimate_of(responses, &items), estimate_of(CHAT, &chat));
        // Retrieving or cancelling generates nothing.
        assert_eq!(estimate_of(responses, &json!({})).output, 0);
    }

    #[test]
    fn chat_prompt_counts_follow_the_published_rule() {
        let body = json!({"messages": [{"role": "user", "content": "Hello there"}]});
        // 3 (priming) + 3 (message) + "user" (1) + "Hello there" (2)
        assert_eq!(estimate_of(CHAT, &body).prompt, 9);
    }

    #[test]
    fn inputs_count_in_every_form() {
        let embeddings = |input: serde_json::Value| {
            estimate_of(Operation::Embeddings, &json!({ "input": input })).prompt
        };
        assert_eq!(embeddings(json!("Hello there")), 2);
        assert_eq!(embeddings(json!(["Hello there", "Hello"])), 3);
        assert_eq!(embeddings(json!([1, 2, 3])), 3);
        assert_eq!(embeddings(json!([[1, 2], [3]])), 3);
    }

    #[test]
    fn estimates_charge_prompt_plus_the_output_cap() {
        let o200k = Encoding::O200kBase;
        let chat =
            json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10});
        assert_eq!(estimate_of(CHAT, &chat).total(), 19);
        let no_cap = json!({"messages": [{"role": "user", "content": "Hello there"}]});
        assert_eq!(
            estimate_of(CHAT, &no_cap),
            TokenEstimate {
                prompt: 9,
                output: 256
            }
        );
        let two = json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10, "n": 2});
        assert_eq!(
            estimate_of(CHAT, &two),
            TokenEstimate {
                prompt: 9,
                output: 20
            }
        );
        let emb = json!({"input": ["Hello there", "Hello"]});
        assert_eq!(estimate_of(Operation::Embeddings, &emb).total(), 3);
        assert_eq!(
            estimate(o200k, Operation::Other, None, 4_000, 256, u64::MAX)
                .unwrap()
                .total(),
            1_000
        );
    }

    #[test]
    fn encodings_differ_and_images_and_tools_are_counted() {
        let text = "Привет, как дела? これは日本語のテキストです。";
        assert_ne!(
            Encoding::O200kBase.count(text),
            Encoding::Cl100kBase.count(text)
        );
        let image = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Hello there"},
            {"type": "image_url", "image_url": {"url": "data:...", "detail": "low"}}]}], "max_tokens": 1});
        assert_eq!(estimate_of(CHAT, &image).total(), 9 + 85 + 1);
        let tools = json!({"messages": [], "max_tokens": 0, "tools": [{"type": "function", "function": {"name": "f"}}]});
        assert!(estimate_of(CHAT, &tools).prompt > 3);
    }

    #[test]
    fn counting_stops_past_the_limit_and_huge_words_are_counted_in_pieces() {
        let word = "a".repeat(200_000);
        let body = json!({"messages": [{"role": "user", "content": word}]}).to_string();
        let fields = RequestFields::parse(body.as_bytes()).unwrap();
        let full = estimate(
            Encoding::O200kBase,
            CHAT,
            Some(&fields),
            body.len(),
            0,
            u64::MAX,
        )
        .unwrap();
        // tiktoken on the whole word would keep ~48 bytes per byte; in pieces, the count
        // is within a token per piece of the whole.
        let exact = Encoding::O200kBase.count_uncached(&word);
        let pieces = word.len().div_ceil(COUNT_PIECE_BYTES) as u64;
        assert!(
            full.prompt >= exact + 7 && full.prompt <= exact + 7 + pieces,
            "{full:?} vs {exact}"
        );
        let limited =
            estimate(Encoding::O200kBase, CHAT, Some(&fields), body.len(), 0, 100).unwrap();
        assert!(
            limited.prompt > 100 && limited.prompt < full.prompt,
            "{limited:?}"
        );
    }

    #[test]
    fn pieces_end_at_whitespace_or_a_char_boundary() {
        let text = "é".repeat(10);
        assert_eq!(piece_of(&text, 5), "éé");
        assert_eq!(piece_of("ab cd ef", 7), "ab cd");
        assert_eq!(piece_of("short", 64), "short");
        // The half-way point inside a character too (a request once panicked here).
        let wide = format!("a{}", "🎉".repeat(10));
        assert_eq!(piece_of(&wide, 20), format!("a{}", "🎉".repeat(4)));
        assert_eq!(
            compact_json("{ \"a b\" : [ 1 , \"\\\" x\" ] }"),
            "{\"a b\":[1,\"\\\" x\"]}"
        );
    }

    #[test]
    fn remembered_counts_are_the_counts() {
        // Same length, different texts; and the same text in both encodings.
        let a = "an apple a day keeps the doctor away; ".repeat(20);
        let b = "zq xv jk wp ql zz xx kk vv pp qq jj ww; ".repeat(20)[..a.len()].to_string();
        assert_eq!(a.len(), b.len());
        assert!(a.len() >= MIN_REMEMBERED_BYTES);
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for text in [&a, &b] {
                let exact = encoding.count_uncached(text);
                assert_eq!(encoding.count(text), exact, "first count");
                assert_eq!(encoding.count(text), exact, "remembered count");
            }
        }
        assert_ne!(Encoding::O200kBase.count(&b), Encoding::O200kBase.count(&a));
    }
}

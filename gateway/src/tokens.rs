//! Token counts as the service counts them (tiktoken, o200k for the gpt-4o family), and the
//! up-front estimate a request is charged against budgets before it is sent.

use std::hash::{Hash, Hasher};

use serde::Deserialize;
use serde_json::{Map, Value};
use tiktoken_rs::CoreBPE;

/// The tokenizer of the model behind a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, o-series.
    #[default]
    O200kBase,
    /// gpt-4, gpt-3.5-turbo, text-embedding-3-*, ada-002.
    Cl100kBase,
}

impl Encoding {
    fn bpe(self) -> &'static CoreBPE {
        match self {
            Self::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Self::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        }
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
        self.bpe().encode_with_special_tokens(text).len() as u64
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

/// Build the tokenizers now rather than on the first request (it takes a moment).
pub fn warm_up() {
    Encoding::O200kBase.count("warm up");
    Encoding::Cl100kBase.count("warm up");
}

/// Tokens of `text` in o200k (the simulator's and gpt-4o's encoding).
pub fn count(text: &str) -> u64 {
    Encoding::O200kBase.count(text)
}

/// Prompt tokens of a chat request by OpenAI's published rule for the gpt-4o family:
/// 3 per message, its role and content (and 1 more with a name), plus 3 to prime the reply.
/// Image parts count as a low-detail image (85).
pub fn chat_prompt_tokens(messages: &[Value]) -> u64 {
    chat_prompt_tokens_in(Encoding::O200kBase, messages)
}

/// [`chat_prompt_tokens`] in a given encoding.
pub fn chat_prompt_tokens_in(encoding: Encoding, messages: &[Value]) -> u64 {
    let count = |text: &str| encoding.count(text);
    let mut total = 3;
    for message in messages {
        total += 3;
        if let Some(role) = message.get("role").and_then(Value::as_str) {
            total += role_tokens(encoding, role);
        }
        if let Some(name) = message.get("name").and_then(Value::as_str) {
            total += count(name) + 1;
        }
        match message.get("content") {
            Some(Value::String(text)) => total += count(text),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            total += part.get("text").and_then(Value::as_str).map_or(0, count)
                        }
                        Some("image_url") => total += image_tokens(part),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    total
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
fn image_tokens(part: &Value) -> u64 {
    match part.pointer("/image_url/detail").and_then(Value::as_str) {
        Some("low") => 85,
        _ => 85 + 170 * 6,
    }
}

/// Tokens of an embeddings/completions `input` or `prompt`: text, texts, or token arrays.
pub fn input_tokens(input: &Value) -> u64 {
    input_tokens_in(Encoding::O200kBase, input)
}

pub fn input_tokens_in(encoding: Encoding, input: &Value) -> u64 {
    match input {
        Value::String(text) => encoding.count(text),
        Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
        Value::Array(items) => items.iter().map(|i| input_tokens_in(encoding, i)).sum(),
        _ => 0,
    }
}

/// Tool and function definitions are sent to the model as text; their JSON is a
/// conservative count of what they add to the prompt.
fn tool_tokens(encoding: Encoding, body: &Map<String, Value>) -> u64 {
    ["tools", "functions"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(|v| encoding.count(&v.to_string()))
        .sum()
}

/// Output tokens a request may produce: `max_completion_tokens` / `max_tokens`, else `default`.
pub fn max_output_tokens(body: &Map<String, Value>, default: u64) -> u64 {
    ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
        .unwrap_or(default)
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
        self.prompt + self.output
    }
}

/// What a request is charged before it is sent: prompt plus the most it may generate.
/// Bodies that are not JSON (audio uploads) are charged a rough byte-based share.
pub fn estimate(
    encoding: Encoding,
    operation: Operation,
    body: Option<&Map<String, Value>>,
    body_len: usize,
    default_max_tokens: u64,
) -> TokenEstimate {
    let by_bytes = TokenEstimate {
        prompt: body_len as u64 / 4,
        output: 0,
    };
    let Some(body) = body else {
        return by_bytes;
    };
    // `n` choices each generate up to the cap.
    let choices = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    match operation {
        Operation::ChatCompletions => {
            let messages = body
                .get("messages")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            TokenEstimate {
                prompt: chat_prompt_tokens_in(encoding, messages) + tool_tokens(encoding, body),
                output: choices * max_output_tokens(body, default_max_tokens),
            }
        }
        Operation::Embeddings => TokenEstimate {
            prompt: body
                .get("input")
                .map_or(0, |i| input_tokens_in(encoding, i)),
            output: 0,
        },
        // Legacy completions default to 16 output tokens, as the service does.
        Operation::Completions => TokenEstimate {
            prompt: body
                .get("prompt")
                .map_or(0, |p| input_tokens_in(encoding, p)),
            output: choices * max_output_tokens(body, 16),
        },
        Operation::Responses | Operation::Other => by_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHAT: Operation = Operation::ChatCompletions;

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
        let o200k = Encoding::O200kBase;
        let legacy = json!({"prompt": "Hello there", "n": 2});
        assert_eq!(
            estimate(o200k, Operation::Completions, legacy.as_object(), 0, 256),
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
    fn chat_prompt_counts_follow_the_published_rule() {
        let messages = [json!({"role": "user", "content": "Hello there"})];
        // 3 (priming) + 3 (message) + "user" (1) + "Hello there" (2)
        assert_eq!(chat_prompt_tokens(&messages), 9);
    }

    #[test]
    fn input_tokens_accepts_every_input_form() {
        assert_eq!(input_tokens(&json!("Hello there")), 2);
        assert_eq!(input_tokens(&json!(["Hello there", "Hello"])), 3);
        assert_eq!(input_tokens(&json!([1, 2, 3])), 3);
        assert_eq!(input_tokens(&json!([[1, 2], [3]])), 3);
    }

    #[test]
    fn estimates_charge_prompt_plus_the_output_cap() {
        let o200k = Encoding::O200kBase;
        let chat =
            json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10});
        assert_eq!(estimate(o200k, CHAT, chat.as_object(), 0, 256).total(), 19);
        let no_cap = json!({"messages": [{"role": "user", "content": "Hello there"}]});
        assert_eq!(
            estimate(o200k, CHAT, no_cap.as_object(), 0, 256),
            TokenEstimate {
                prompt: 9,
                output: 256
            }
        );
        let two = json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10, "n": 2});
        assert_eq!(
            estimate(o200k, CHAT, two.as_object(), 0, 256),
            TokenEstimate {
                prompt: 9,
                output: 20
            }
        );
        let emb = json!({"input": ["Hello there", "Hello"]});
        assert_eq!(
            estimate(o200k, Operation::Embeddings, emb.as_object(), 0, 256).total(),
            3
        );
        assert_eq!(
            estimate(o200k, Operation::Other, None, 4_000, 256).total(),
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
        assert_eq!(
            estimate(Encoding::O200kBase, CHAT, image.as_object(), 0, 256).total(),
            9 + 85 + 1
        );
        let tools = json!({"messages": [], "max_tokens": 0, "tools": [{"type": "function", "function": {"name": "f"}}]});
        assert!(estimate(Encoding::O200kBase, CHAT, tools.as_object(), 0, 256).prompt > 3);
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

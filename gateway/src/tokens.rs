//! Token counts as the service counts them (tiktoken, o200k for the gpt-4o family), and the
//! up-front estimate a request is charged against budgets before it is sent.

use serde::Deserialize;
use serde_json::{Map, Value};
use tiktoken_rs::CoreBPE;

/// The tokenizer of the model behind a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
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

    pub fn count(self, text: &str) -> u64 {
        self.bpe().encode_with_special_tokens(text).len() as u64
    }
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
            total += count(role);
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

/// What a request is charged before it is sent: prompt plus the most it may generate.
/// Bodies that are not JSON (audio uploads) are charged a rough byte-based share.
pub fn estimate(
    encoding: Encoding,
    operation: &str,
    body: Option<&Map<String, Value>>,
    body_len: usize,
    default_max_tokens: u64,
) -> u64 {
    let Some(body) = body else {
        return body_len as u64 / 4;
    };
    let operation = operation.split('?').next().unwrap_or_default();
    // `n` choices each generate up to the cap.
    let choices = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    if operation.ends_with("chat/completions") {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        chat_prompt_tokens_in(encoding, messages)
            + tool_tokens(encoding, body)
            + choices * max_output_tokens(body, default_max_tokens)
    } else if operation.ends_with("embeddings") {
        body.get("input")
            .map_or(0, |i| input_tokens_in(encoding, i))
    } else if operation.ends_with("completions") {
        body.get("prompt")
            .map_or(0, |p| input_tokens_in(encoding, p))
            + choices * max_output_tokens(body, 16)
    } else {
        body_len as u64 / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        assert_eq!(
            estimate(o200k, "chat/completions", chat.as_object(), 0, 256),
            19
        );
        let no_cap = json!({"messages": [{"role": "user", "content": "Hello there"}]});
        assert_eq!(
            estimate(o200k, "chat/completions", no_cap.as_object(), 0, 256),
            9 + 256
        );
        let two = json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10, "n": 2});
        assert_eq!(
            estimate(o200k, "chat/completions", two.as_object(), 0, 256),
            29
        );
        let emb = json!({"input": ["Hello there", "Hello"]});
        assert_eq!(estimate(o200k, "embeddings", emb.as_object(), 0, 256), 3);
        assert_eq!(
            estimate(o200k, "audio/transcriptions", None, 4_000, 256),
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
            estimate(
                Encoding::O200kBase,
                "chat/completions",
                image.as_object(),
                0,
                256
            ),
            9 + 85 + 1
        );
        let tools = json!({"messages": [], "max_tokens": 0, "tools": [{"type": "function", "function": {"name": "f"}}]});
        assert!(
            estimate(
                Encoding::O200kBase,
                "chat/completions",
                tools.as_object(),
                0,
                256
            ) > 3
        );
    }
}

//! Token counts as the service reports them in `usage`, by OpenAI's published rule for the
//! gpt-4o family (o200k_base): a chat prompt is 3 tokens to prime the reply, and per message
//! 3, its role, its text (and 1 more with a name). Written apart from the gateway's estimator
//! on purpose: `tests/estimates.rs` runs one against the other.

use serde_json::Value;
use tiktoken_rs::CoreBPE;

fn o200k() -> &'static CoreBPE {
    tiktoken_rs::o200k_base_singleton()
}

/// Load the vocabulary now, not on the first request (it takes a moment, which would count
/// as the first answer's latency).
pub fn warm_up() {
    o200k();
}

/// Texts longer than this are counted in pieces cut at whitespace (where the encoder splits
/// words anyway), so no single merge grows with the request.
const PIECE_BYTES: usize = 64 * 1024;

/// Tokens of `text`.
pub fn count(text: &str) -> u64 {
    let mut total = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(PIECE_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end < rest.len() {
            end = rest[..end]
                .rfind(char::is_whitespace)
                .filter(|&at| at > 0)
                .unwrap_or(end);
        }
        total += o200k().encode_with_special_tokens(&rest[..end]).len() as u64;
        rest = &rest[end..];
    }
    total
}

/// A chat prompt: 3 to prime the reply, then each message.
pub fn chat_prompt(messages: &[Value]) -> u64 {
    3 + messages.iter().map(message).sum::<u64>()
}

/// One message: 3, its role, name (+1) and content. Something that is not a message object
/// counts its 3.
fn message(message: &Value) -> u64 {
    let Some(message) = message.as_object() else {
        return 3;
    };
    let text = |field: &str| message.get(field).and_then(Value::as_str);
    3 + text("role").map_or(0, count)
        + text("name").map_or(0, |name| count(name) + 1)
        + match message.get("content") {
            Some(Value::String(content)) => count(content),
            Some(Value::Array(parts)) => parts.iter().map(part).sum(),
            _ => 0,
        }
}

/// A content part: its text, or an image. The service counts an image by its size, which the
/// simulator does not decode: 85 at low detail, else the most a high-detail image costs
/// (85 + 170 for each of at most 6 tiles).
fn part(part: &Value) -> u64 {
    match part.get("type").and_then(Value::as_str) {
        Some("text" | "input_text" | "output_text") => {
            part.get("text").and_then(Value::as_str).map_or(0, count)
        }
        Some("image_url" | "input_image") => {
            let detail = part
                .pointer("/image_url/detail")
                .or_else(|| part.get("detail"))
                .and_then(Value::as_str);
            if detail == Some("low") {
                85
            } else {
                85 + 170 * 6
            }
        }
        _ => 0,
    }
}

/// An embeddings `input` or completions `prompt`: a text, token ids (one each), or a list of
/// them.
pub fn input(input: &Value) -> u64 {
    match input {
        Value::String(text) => count(text),
        Value::Number(_) => 1,
        Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
        Value::Array(items) => items.iter().map(self::input).sum(),
        _ => 0,
    }
}

/// A Responses API create: its `input` (a text, as one user message, or items read as chat
/// messages), its `instructions` (a system message) and its tool definitions (their JSON).
pub fn responses_prompt(request: &Value) -> u64 {
    let input = match request.get("input") {
        Some(Value::String(text)) => 3 + 3 + count("user") + count(text),
        Some(Value::Array(items)) => chat_prompt(items),
        _ => 0,
    };
    let instructions = request
        .get("instructions")
        .and_then(Value::as_str)
        .map_or(0, |text| 3 + count("system") + count(text));
    let tools: u64 = ["tools", "functions"]
        .iter()
        .filter_map(|field| request.get(*field).filter(|v| !v.is_null()))
        .map(|definitions| count(&definitions.to_string()))
        .sum();
    input + instructions + tools
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_chat_prompt_counts_by_the_published_rule() {
        // "Hello there" is 2 tokens, "user" 1: 3 + (3 + 1 + 2).
        let messages = [json!({ "role": "user", "content": "Hello there" })];
        assert_eq!(chat_prompt(&messages), 9);
    }

    #[test]
    fn long_texts_count_as_a_whole_does() {
        let text = "word ".repeat(40_000);
        assert_eq!(
            count(&text),
            o200k().encode_with_special_tokens(&text).len() as u64
        );
    }

    #[test]
    fn inputs_count_texts_and_token_ids() {
        assert_eq!(input(&json!([1, 2, 3])), 3);
        assert_eq!(input(&json!([[1, 2], [3]])), 3);
        assert_eq!(input(&json!(["Hello there", "Hello there"])), 4);
    }
}

//! Token counts as the service counts them (tiktoken, o200k for the gpt-4o family), and the
//! up-front estimate a request is charged against budgets before it is sent.

use serde_json::{Map, Value};
use tiktoken_rs::CoreBPE;

fn bpe() -> &'static CoreBPE {
    tiktoken_rs::o200k_base_singleton()
}

/// Build the tokenizer now rather than on the first request (it takes a moment).
pub fn warm_up() {
    count("warm up");
}

pub fn count(text: &str) -> u64 {
    bpe().encode_with_special_tokens(text).len() as u64
}

/// Prompt tokens of a chat request by OpenAI's published rule for the gpt-4o family:
/// 3 per message, its role and content (and 1 more with a name), plus 3 to prime the reply.
/// Image parts count as a low-detail image (85).
pub fn chat_prompt_tokens(messages: &[Value]) -> u64 {
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
                        Some("image_url") => total += 85,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    total
}

/// Tokens of an embeddings/completions `input` or `prompt`: text, texts, or token arrays.
pub fn input_tokens(input: &Value) -> u64 {
    match input {
        Value::String(text) => count(text),
        Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
        Value::Array(items) => items.iter().map(input_tokens).sum(),
        _ => 0,
    }
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
    operation: &str,
    body: Option<&Map<String, Value>>,
    body_len: usize,
    default_max_tokens: u64,
) -> u64 {
    let Some(body) = body else {
        return body_len as u64 / 4;
    };
    let operation = operation.split('?').next().unwrap_or_default();
    if operation.ends_with("chat/completions") {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        chat_prompt_tokens(messages) + max_output_tokens(body, default_max_tokens)
    } else if operation.ends_with("embeddings") {
        body.get("input").map_or(0, input_tokens)
    } else if operation.ends_with("completions") {
        body.get("prompt").map_or(0, input_tokens) + max_output_tokens(body, 16)
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
        let chat =
            json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 10});
        assert_eq!(estimate("chat/completions", chat.as_object(), 0, 256), 19);
        let no_cap = json!({"messages": [{"role": "user", "content": "Hello there"}]});
        assert_eq!(
            estimate("chat/completions", no_cap.as_object(), 0, 256),
            9 + 256
        );
        let emb = json!({"input": ["Hello there", "Hello"]});
        assert_eq!(estimate("embeddings", emb.as_object(), 0, 256), 3);
        assert_eq!(estimate("audio/transcriptions", None, 4_000, 256), 1_000);
    }
}

//! Token counts (tiktoken, as the real service counts them) and generated text.

use serde_json::Value;
use tiktoken_rs::CoreBPE;

fn bpe() -> &'static CoreBPE {
    tiktoken_rs::o200k_base_singleton()
}

pub fn count(text: &str) -> u64 {
    bpe().encode_with_special_tokens(text).len() as u64
}

/// Prompt tokens of a chat request, by OpenAI's published rule for the gpt-4o family:
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

/// Words that are one o200k token each, cycled to make replies of an exact token count.
const WORDS: [&str; 12] = [
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", " and", " runs",
    " away",
];

/// The `n` pieces of a reply, one token each.
pub fn reply_pieces(n: u32) -> Vec<&'static str> {
    (0..n as usize).map(|i| WORDS[i % WORDS.len()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reply_pieces_are_one_token_each() {
        let pieces = reply_pieces(30);
        assert_eq!(count(&pieces.concat()), 30);
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
}

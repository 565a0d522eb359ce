//! Prompt-cache affinity. Azure caches prompt prefixes of 1,024 tokens or more per
//! deployment, and cached input tokens cost a provisioned deployment nothing. Spreading a
//! conversation over members throws that away, so requests that share a prefix prefer, inside
//! their tier, one member: the rendezvous (highest random weight) choice for their key. Every
//! replica computes the same choice, and a member leaving moves only its own keys.

use std::hash::{DefaultHasher, Hash, Hasher};

use std::ops::ControlFlow;

use crate::proxy::request_fields::{Content, Message, RequestFields, ResponsesInput, each_message};
use crate::routing_table::Member;

/// Prompts shorter than this are not cached by the service: no key from their text.
pub const MIN_CACHED_PROMPT_TOKENS: u64 = 1_024;
/// About 1,024 tokens of text: the prefix a long prompt's key is taken from.
const PREFIX_BYTES: usize = 4 * 1_024;

/// The key a request's cache affinity follows: the client's `prompt_cache_key` (or `user`),
/// else, for a prompt long enough to be cached, its first ~1,024 tokens of text.
pub fn cache_key(fields: &RequestFields, prompt_tokens: u64) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    if let Some(key) = fields.prompt_cache_key.get().or(fields.user.get()) {
        ("key", key.as_str()).hash(&mut hasher);
        return Some(hasher.finish());
    }
    if prompt_tokens < MIN_CACHED_PROMPT_TOKENS {
        return None;
    }
    let mut left = PREFIX_BYTES;
    let mut take = |text: &str| {
        let piece = prefix_of(text, left);
        piece.hash(&mut hasher);
        left -= piece.len();
        left > 0
    };
    let mut open = fields.instructions.get().is_none_or(|i| take(i.as_str()));
    let list = match (fields.messages, fields.responses_input()) {
        (Some(messages), _) => Some(messages),
        (None, Some(ResponsesInput::Items(items))) => Some(items),
        (None, Some(ResponsesInput::Text(text))) => {
            open = open && take(&text);
            None
        }
        (None, None) => None,
    };
    if let Some(list) = list.filter(|_| open) {
        // The shape was checked in admission; a walk that fails only ends the prefix.
        let _ = each_message(list, "messages", |message| {
            if hash_message(message, &mut take) {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        });
    }
    Some(hasher.finish())
}

/// Feed a message's role and text to `take`; false once the prefix is complete.
fn hash_message(message: &Message, take: &mut impl FnMut(&str) -> bool) -> bool {
    if let Some(role) = &message.role
        && !take(role.as_str())
    {
        return false;
    }
    match &message.content {
        Content::Text(text) => take(text),
        parts @ Content::Parts(_) => parts
            .each_part(|part| match part.text.get() {
                Some(text) if !take(text.as_str()) => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            })
            .is_ok_and(|flow| flow.is_continue()),
        Content::Absent => true,
    }
}

/// At most `bytes` of `text`, cut at a character boundary.
fn prefix_of(text: &str, bytes: usize) -> &str {
    if text.len() <= bytes {
        return text;
    }
    let mut end = bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Index of the member `key` belongs to among `tier`: the highest hash of key and member.
pub fn rendezvous(key: u64, tier: &[&Member]) -> Option<usize> {
    tier.iter()
        .enumerate()
        .max_by_key(|(_, m)| {
            let mut hasher = DefaultHasher::new();
            (key, m.backend.id.as_str()).hash(&mut hasher);
            hasher.finish()
        })
        .map(|(i, _)| i)
}

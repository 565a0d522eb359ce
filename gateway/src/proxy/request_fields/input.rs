//! An embeddings `input` or completions `prompt`, counted as it is read: texts, token ids,
//! or lists of them, one element at a time.

use std::fmt;

use serde::Deserializer;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::ShapeError;

/// Tokens of an embeddings `input` or completions `prompt`: texts handed to `count` (which
/// answers `None` to stop early), token ids one each, a list of token ids its length. Read
/// one element at a time. Refused: objects, booleans or null inside.
pub fn input_tokens(
    raw: &RawValue,
    count: &mut dyn FnMut(&str) -> Option<u64>,
) -> Result<u64, ShapeError> {
    let mut stopped = false;
    let seed = InputSeed {
        count,
        stopped: &mut stopped,
    };
    match seed.deserialize(&mut serde_json::Deserializer::from_str(raw.get())) {
        Ok(node) => Ok(node.tokens()),
        Err(_) if stopped => Ok(u64::MAX),
        Err(_) => Err(ShapeError(
            "'input' must be text, token ids, or a list of them.".into(),
        )),
    }
}

/// What one input node counted.
enum InputNode {
    Text(u64),
    Number,
    List {
        tokens: u64,
        len: u64,
        all_numbers: bool,
    },
}

impl InputNode {
    fn tokens(&self) -> u64 {
        match *self {
            Self::Text(n) => n,
            Self::Number => 1,
            Self::List {
                tokens,
                len,
                all_numbers,
            } => {
                if all_numbers {
                    len
                } else {
                    tokens
                }
            }
        }
    }
}

struct InputSeed<'c> {
    count: &'c mut dyn FnMut(&str) -> Option<u64>,
    stopped: &'c mut bool,
}

impl<'de> DeserializeSeed<'de> for InputSeed<'_> {
    type Value = InputNode;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<InputNode, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for InputSeed<'_> {
    type Value = InputNode;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("text, token ids, or a list of them")
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<InputNode, E> {
        Ok(InputNode::Number)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<InputNode, E> {
        Ok(InputNode::Number)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<InputNode, E> {
        Ok(InputNode::Number)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<InputNode, E> {
        match (self.count)(v) {
            Some(n) => Ok(InputNode::Text(n)),
            None => {
                *self.stopped = true;
                Err(E::custom("stopped"))
            }
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InputNode, A::Error> {
        let (mut tokens, mut len, mut all_numbers) = (0u64, 0u64, true);
        loop {
            let seed = InputSeed {
                count: &mut *self.count,
                stopped: &mut *self.stopped,
            };
            let Some(node) = seq.next_element_seed(seed)? else {
                break;
            };
            len += 1;
            match node {
                InputNode::Number => {}
                other => {
                    all_numbers = false;
                    tokens = tokens.saturating_add(other.tokens_as_item());
                }
            }
        }
        Ok(InputNode::List {
            tokens,
            len,
            all_numbers,
        })
    }
}

impl InputNode {
    /// What a node adds inside a list that is not all token ids (a stray id adds nothing).
    fn tokens_as_item(&self) -> u64 {
        match self {
            Self::Number => 0,
            other => other.tokens(),
        }
    }
}

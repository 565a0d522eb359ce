//! The fields of a JSON request body that admission reads (the pool's `model`, `stream`, the
//! output caps and what the prompt is made of), borrowed from the body's bytes in one pass
//! that skips everything else. Reading the body into a `serde_json::Value` tree allocated
//! and hashed every key (about 6k instructions for a one-line chat request, callgrind).
//!
//! Memory stays bounded by the body, not by its shape: lists (messages, content parts,
//! embeddings inputs) are kept as raw slices of the body and read one element at a time
//! ([`each_message`], [`Content::each_part`], [`input_tokens`]), so `[1,1,1,…]` or
//! `[{},{},…]` costs no allocation per element.
//!
//! Scalar fields are lenient: a value of an unexpected type reads as absent, and the
//! upstream answers it with its own message. Broken JSON, a body that is not an object, a
//! field given twice, and messages that are not message objects are refused by the gateway.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{ControlFlow, Range};

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

mod input;
mod lenient;

pub use input::input_tokens;
pub use lenient::{Lenient, Object, Text};
use lenient::{StrictObject, Walk};

/// What admission reads of a request body.
#[derive(Default, Deserialize)]
pub struct RequestFields<'a> {
    /// The pool (v1 route), as sent: its place in the body is where the v1 route writes each
    /// member's deployment name.
    #[serde(default, borrow)]
    pub model: Option<&'a RawValue>,
    #[serde(default)]
    pub stream: Lenient<bool>,
    /// As sent, `null` included (where the gateway asks for a stream's usage).
    #[serde(default, borrow, deserialize_with = "present")]
    pub stream_options: Option<&'a RawValue>,
    #[serde(default)]
    pub n: Lenient<u64>,
    #[serde(default)]
    pub max_tokens: Lenient<u64>,
    #[serde(default)]
    pub max_completion_tokens: Lenient<u64>,
    /// The Responses API's output cap.
    #[serde(default)]
    pub max_output_tokens: Lenient<u64>,
    /// A Responses API follow-up: the stored response it continues.
    #[serde(default, borrow)]
    pub previous_response_id: Lenient<Text<'a>>,
    /// `false`: the Responses API stores nothing (and there is nothing to pin).
    #[serde(default)]
    pub store: Lenient<bool>,
    /// Prompt-cache routing hint (`user` is the older one).
    #[serde(default, borrow)]
    pub prompt_cache_key: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    pub user: Lenient<Text<'a>>,
    /// The Responses API's system prompt.
    #[serde(default, borrow)]
    pub instructions: Lenient<Text<'a>>,
    /// Chat messages, as sent: read with [`each_message`].
    #[serde(default, borrow)]
    pub messages: Option<&'a RawValue>,
    /// Tool and function definitions, as sent (counted from their JSON).
    #[serde(default, borrow)]
    pub tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub functions: Option<&'a RawValue>,
    /// Embeddings input (text or token ids) or Responses input (text or items): read by
    /// the operation's rule, see [`input_tokens`] and [`RequestFields::responses_input`].
    #[serde(default, borrow)]
    pub input: Option<&'a RawValue>,
    /// Legacy completions prompt (read with [`input_tokens`]).
    #[serde(default, borrow)]
    pub prompt: Option<&'a RawValue>,
    /// `auto`, `default`, `flex`, `priority`, ...: `flex` lowers the request's traffic
    /// class; a priority member's attempt sets it to `priority` (its place in the body).
    #[serde(default, borrow)]
    pub service_tier: Option<&'a RawValue>,
    /// `model` read as text (set by [`RequestFields::parse`]).
    #[serde(skip)]
    model_name: Option<Text<'a>>,
}

impl<'a> RequestFields<'a> {
    /// Read a JSON body. Errors are the client's: broken JSON, JSON that is not an object, or
    /// a field the gateway reads given twice (the gateway and the upstream could read
    /// different ones).
    pub fn parse(body: &'a [u8]) -> Result<Self, FieldsError> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            // Tell broken JSON from JSON of the wrong shape.
            return Err(match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => FieldsError::NotAnObject,
                Err(e) => FieldsError::Json(e),
            });
        }
        if !nesting_within(body, MAX_NESTING) {
            return Err(FieldsError::TooDeep);
        }
        let mut fields: Self = serde_json::from_slice(body).map_err(FieldsError::Json)?;
        fields.model_name = fields
            .model
            .and_then(|raw| serde_json::from_str::<Text<'a>>(raw.get()).ok());
        Ok(fields)
    }

    pub fn model(&self) -> Option<&str> {
        self.model_name.as_ref().map(Text::as_str)
    }

    /// `service_tier` when it is a string.
    pub fn service_tier(&self) -> Option<Text<'a>> {
        self.service_tier
            .and_then(|raw| serde_json::from_str::<Text<'a>>(raw.get()).ok())
    }

    pub fn stream(&self) -> bool {
        self.stream.0 == Some(true)
    }

    /// The client asked for the stream's usage chunk itself.
    pub fn asks_stream_usage(&self) -> bool {
        self.stream_options().is_some_and(|o| {
            serde_json::from_str::<bool>(o.include_usage.map_or("", |r| r.get())).ok() == Some(true)
        })
    }

    /// `stream_options` when it is an object.
    pub fn stream_options(&self) -> Option<StreamOptions<'a>> {
        let raw = self.stream_options?;
        serde_json::from_str::<Object<StreamOptions<'a>>>(raw.get())
            .ok()
            .and_then(|o| o.0)
    }

    /// The output cap the client set: `max_completion_tokens`, else `max_tokens`, else
    /// (Responses) `max_output_tokens`.
    pub fn output_cap(&self) -> Option<u64> {
        self.max_completion_tokens
            .0
            .or(self.max_tokens.0)
            .or(self.max_output_tokens.0)
    }

    /// `input` as the Responses API reads it: text, or a list of items (read with
    /// [`each_message`]).
    pub fn responses_input(&self) -> Option<ResponsesInput<'a>> {
        let raw = self.input?;
        match raw.get().as_bytes().first() {
            Some(b'"') => serde_json::from_str::<Text<'a>>(raw.get())
                .ok()
                .map(|t| ResponsesInput::Text(t.0)),
            Some(b'[') => Some(ResponsesInput::Items(raw)),
            _ => None,
        }
    }

    /// The shapes the gateway relies on, checked without building anything: chat
    /// `messages` (and, for a Responses API create, `input` items) are message objects whose
    /// `content` is text, null, or a list of part objects. Admission gets the same answer
    /// from counting the prompt (`tokens::estimate` walks these lists with the same rules),
    /// so it does not walk them twice; this is the rule on its own.
    pub fn check_shape(&self, responses_create: bool) -> Result<(), ShapeError> {
        if let Some(messages) = self.messages {
            let _ = each_message(messages, "messages", |_| ControlFlow::Continue(()))?;
        }
        if let Some(ResponsesInput::Items(items)) =
            self.responses_input().filter(|_| responses_create)
        {
            let _ = each_message(items, "input", |_| ControlFlow::Continue(()))?;
        }
        Ok(())
    }
}

/// A field that is there, whatever its value (`null` too).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(deserializer).map(Some)
}

/// Where a raw value lies in the body it was read from (for byte edits).
pub fn span_in(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    debug_assert!(start + raw.get().len() <= body.len());
    start..start + raw.get().len()
}

#[derive(Debug)]
pub enum FieldsError {
    Json(serde_json::Error),
    NotAnObject,
    /// Nested deeper than [`MAX_NESTING`] (no request needs it; parsers downstream may
    /// recurse on it).
    TooDeep,
}

/// Most levels of arrays and objects a body may nest (serde_json's own recursion limit).
pub const MAX_NESTING: usize = 128;

/// The body nests at most `max` levels (strings skipped). Skipping a value serde does not
/// read is iterative and has no such limit, so it is checked here, in one pass.
fn nesting_within(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut at = 0;
    while at < body.len() {
        match body[at] {
            b'"' => {
                // Skip the string: to its closing quote, past escaped characters.
                at += 1;
                while at < body.len() && body[at] != b'"' {
                    at += if body[at] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    true
}

/// A body of the wrong shape, with the field it is about (the message names the position,
/// never echoes the content).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Default, Deserialize)]
pub struct StreamOptions<'a> {
    /// As sent (its place in the body is where the gateway writes `true`).
    #[serde(default, borrow)]
    pub include_usage: Option<&'a RawValue>,
}

/// One chat message (or Responses input item): what the published counting rule reads.
pub struct Message<'a> {
    pub role: Option<Text<'a>>,
    pub name: Option<Text<'a>>,
    pub content: Content<'a>,
}

/// A message as it is in the body; its content is checked and read by [`each_message`].
#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(default, borrow)]
    role: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    name: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

/// A message's content: text, or parts (text and images) read one at a time.
#[derive(Default)]
pub enum Content<'a> {
    #[default]
    Absent,
    Text(Cow<'a, str>),
    Parts(&'a RawValue),
}

impl<'a> Content<'a> {
    fn read(raw: Option<&'a RawValue>) -> Result<Self, &'static str> {
        let Some(raw) = raw else {
            return Ok(Self::Absent);
        };
        match raw.get().as_bytes().first() {
            Some(b'"') => serde_json::from_str::<Text<'a>>(raw.get())
                .map(|t| Self::Text(t.0))
                .map_err(|_| "content is not valid text"),
            Some(b'[') => {
                let parts = Self::Parts(raw);
                let _ = parts.each_part(|_| ControlFlow::Continue(()))?;
                Ok(parts)
            }
            Some(b'n') => Ok(Self::Absent),
            _ => Err("content must be text or a list of content parts"),
        }
    }

    /// Each part of a list content, in order, until `visit` breaks (then `Break`). Every
    /// part is an object.
    pub fn each_part(
        &self,
        mut visit: impl FnMut(&Part<'a>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, &'static str> {
        let Self::Parts(raw) = self else {
            return Ok(ControlFlow::Continue(()));
        };
        let mut stopped = false;
        let walk = Walk {
            visit: &mut |part: StrictObject<Part<'a>>| {
                let flow = visit(&part.0);
                stopped = flow.is_break();
                flow
            },
            index: &mut 0,
            expecting: "a list of content parts",
            _element: PhantomData,
        };
        match serde_json::Deserializer::from_str(raw.get()).deserialize_seq(walk) {
            Ok(()) => Ok(ControlFlow::Continue(())),
            Err(_) if stopped => Ok(ControlFlow::Break(())),
            Err(_) => Err("content parts must be objects"),
        }
    }
}

#[derive(Default, Deserialize)]
pub struct Part<'a> {
    #[serde(default, borrow, rename = "type")]
    pub kind: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    pub text: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    pub image_url: Object<ImageUrl<'a>>,
}

#[derive(Default, Deserialize)]
pub struct ImageUrl<'a> {
    #[serde(default, borrow)]
    pub detail: Lenient<Text<'a>>,
}

/// A Responses API `input`: one text, or a list of items read like chat messages (role and
/// content; content parts of type `input_text`/`output_text` are text).
pub enum ResponsesInput<'a> {
    Text(Cow<'a, str>),
    Items(&'a RawValue),
}

/// Each message of `list` (chat `messages`, Responses `input` items), in order, one at a
/// time, until `visit` breaks (then `Break`). Refused (naming `field[index]`): an element that is not an
/// object, content that is neither text, null nor a list of part objects, a list that is not
/// a list.
pub fn each_message<'a>(
    list: &'a RawValue,
    field: &str,
    mut visit: impl FnMut(&Message<'a>) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, ShapeError> {
    let mut stopped = false;
    let mut index = 0;
    let mut problem = None;
    let walk = Walk {
        visit: &mut |raw: StrictObject<RawMessage<'a>>| {
            let raw = raw.0;
            let content = match Content::read(raw.content) {
                Ok(content) => content,
                Err(why) => {
                    problem = Some(why);
                    return ControlFlow::Break(());
                }
            };
            let message = Message {
                role: raw.role.0,
                name: raw.name.0,
                content,
            };
            let flow = visit(&message);
            stopped = flow.is_break();
            flow
        },
        index: &mut index,
        expecting: "a list of message objects",
        _element: PhantomData,
    };
    let result = serde_json::Deserializer::from_str(list.get()).deserialize_seq(walk);
    if let Some(why) = problem {
        return Err(ShapeError(format!("'{field}[{index}]': {why}.")));
    }
    match result {
        Ok(()) => Ok(ControlFlow::Continue(())),
        Err(_) if stopped => Ok(ControlFlow::Break(())),
        Err(_) if list.get().starts_with('[') => Err(ShapeError(format!(
            "'{field}[{index}]' must be an object (a message)."
        ))),
        Err(_) => Err(ShapeError(format!(
            "'{field}' must be a list of message objects."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages_of(body: &[u8]) -> Result<Vec<(Option<String>, &'static str)>, ShapeError> {
        let fields = RequestFields::parse(body).expect("valid JSON object");
        let mut seen = Vec::new();
        let _ = each_message(fields.messages.expect("messages"), "messages", |m| {
            let kind = match &m.content {
                Content::Absent => "absent",
                Content::Text(_) => "text",
                Content::Parts(_) => "parts",
            };
            seen.push((m.role.as_ref().map(|r| r.as_str().to_owned()), kind));
            ControlFlow::Continue(())
        })?;
        Ok(seen)
    }

    #[test]
    fn scalar_fields_of_unexpected_types_read_as_absent_and_the_rest_still_reads() {
        let body = br#"{"model": 7, "stream": "yes", "n": {"a": [1, {"b": 2}]},
            "max_tokens": -1, "max_completion_tokens": 12,
            "messages": [{"role": 1, "content": "Hi \"you\""},
                         {"role": "user", "content": [{"type": "text", "text": "x"}, {}]},
                         {"role": "assistant", "content": null}],
            "stream_options": [true], "tools": [{"type": "function"}], "extra": {"deep": [[[]]]}}"#;
        let fields = RequestFields::parse(body).expect("valid JSON object");
        assert_eq!(fields.model(), None);
        assert!(!fields.stream());
        assert_eq!(fields.n.0, None);
        assert_eq!(fields.output_cap(), Some(12));
        assert!(!fields.asks_stream_usage());
        assert!(fields.tools.is_some());
        fields.check_shape(true).expect("a valid shape");
        assert_eq!(
            messages_of(body).unwrap(),
            [
                (None, "text"),
                (Some("user".into()), "parts"),
                (Some("assistant".into()), "absent")
            ]
        );
    }

    #[test]
    fn messages_of_the_wrong_shape_are_refused_naming_the_position() {
        for (body, position) in [
            (&br#"{"messages": [1, 1, 1]}"#[..], "'messages[0]'"),
            (
                br#"{"messages": [{"role": "user"}, "hi"]}"#,
                "'messages[1]'",
            ),
            (br#"{"messages": [{"content": 5}]}"#, "'messages[0]'"),
            (
                br#"{"messages": [{"content": {"text": "x"}}]}"#,
                "'messages[0]'",
            ),
            (
                br#"{"messages": [{}, {"content": [{"type": "text"}, 7]}]}"#,
                "'messages[1]'",
            ),
            (
                br#"{"messages": [["user", "positional"]]}"#,
                "'messages[0]'",
            ),
            (br#"{"messages": "hello"}"#, "'messages'"),
            (br#"{"input": [{"role": "user"}, 3]}"#, "'input[1]'"),
        ] {
            let fields = RequestFields::parse(body).unwrap();
            let err = fields.check_shape(true).expect_err("refused");
            assert!(
                err.0.starts_with(position),
                "{err} for {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn nesting_is_bounded_outside_strings() {
        let deep = |n: usize| format!("{{\"x\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert!(RequestFields::parse(deep(MAX_NESTING - 1).as_bytes()).is_ok());
        assert!(matches!(
            RequestFields::parse(deep(MAX_NESTING).as_bytes()),
            Err(FieldsError::TooDeep)
        ));
        let in_string = format!("{{\"x\":\"{}\\\"\"}}", "[".repeat(1000));
        assert!(RequestFields::parse(in_string.as_bytes()).is_ok());
    }

    #[test]
    fn a_field_given_twice_is_refused() {
        assert!(matches!(
            RequestFields::parse(br#"{"model": "a", "model": "b"}"#),
            Err(FieldsError::Json(_))
        ));
    }

    #[test]
    fn a_walk_stops_when_asked() {
        let fields = RequestFields::parse(br#"{"messages": [{}, {}, {}, 1]}"#).unwrap();
        let mut seen = 0;
        let stopped = each_message(fields.messages.unwrap(), "messages", |_| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("stopped before the bad element");
        assert_eq!(stopped, ControlFlow::Break(()));
        assert_eq!(seen, 2);
    }

    #[test]
    fn inputs_are_counted_one_element_at_a_time() {
        let count = |json: &str| {
            let raw: &RawValue = serde_json::from_str(json).unwrap();
            input_tokens(raw, &mut |text| Some(text.len() as u64))
        };
        assert_eq!(count(r#""abc""#), Ok(3));
        assert_eq!(count("[1, 2, 3]"), Ok(3));
        assert_eq!(count(r#"[[1, 2], "ab", 3]"#), Ok(4));
        assert!(count(r#"[{"a": 1}]"#).is_err());
        assert!(count("[true]").is_err());
        let raw: &RawValue = serde_json::from_str(r#"["a", "b", "c"]"#).unwrap();
        let mut calls = 0;
        let stopped = input_tokens(raw, &mut |_| {
            calls += 1;
            (calls < 2).then_some(1)
        });
        assert_eq!((stopped, calls), (Ok(u64::MAX), 2));
    }

    #[test]
    fn broken_json_and_other_shapes_are_refused() {
        assert!(matches!(
            RequestFields::parse(b"[1, 2]"),
            Err(FieldsError::NotAnObject)
        ));
        assert!(matches!(
            RequestFields::parse(b"{\"model\": "),
            Err(FieldsError::Json(_))
        ));
        assert!(matches!(
            RequestFields::parse(b"{} trailing"),
            Err(FieldsError::Json(_))
        ));
        assert!(matches!(
            RequestFields::parse(b""),
            Err(FieldsError::Json(_))
        ));
    }

    #[test]
    fn strings_are_borrowed_unless_escaped() {
        let body = br#"{"model": "gpt-4o", "messages": [{"role": "u\u0073er"}]}"#;
        let fields = RequestFields::parse(body).unwrap();
        assert!(matches!(
            fields.model_name,
            Some(Text(Cow::Borrowed("gpt-4o")))
        ));
        let mut owned = false;
        let _ = each_message(fields.messages.unwrap(), "messages", |m| {
            owned = matches!(&m.role, Some(Text(Cow::Owned(s))) if s == "user");
            ControlFlow::Continue(())
        })
        .unwrap();
        assert!(owned);
    }
}

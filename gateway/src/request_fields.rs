//! The fields of a JSON request body that admission reads (the pool's `model`, `stream`, the
//! output caps and what the prompt is made of), borrowed from the body's bytes in one pass
//! that skips everything else. Reading the body into a `serde_json::Value` tree allocated
//! and hashed every key (about 6k instructions for a one-line chat request, callgrind).
//!
//! Every field is lenient: a value of an unexpected type reads as absent, and the upstream
//! answers it with its own message. Only broken JSON and a body that is not an object are
//! refused by the gateway itself.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{BorrowedStrDeserializer, MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, IgnoredAny, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// What admission reads of a request body.
#[derive(Default, Deserialize)]
pub struct RequestFields<'a> {
    #[serde(default, borrow)]
    pub model: Lenient<Text<'a>>,
    #[serde(default)]
    pub stream: Lenient<bool>,
    #[serde(default)]
    pub stream_options: Object<StreamOptions>,
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
    #[serde(default, borrow)]
    pub messages: Lenient<Vec<Object<Message<'a>>>>,
    /// Tool and function definitions, as sent (counted from their JSON).
    #[serde(default, borrow)]
    pub tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub functions: Option<&'a RawValue>,
    /// Embeddings input (text or token ids) or Responses input (text or items): read by
    /// the operation's rule, see [`RequestFields::embeddings_input`] and
    /// [`RequestFields::responses_input`].
    #[serde(default, borrow)]
    pub input: Option<&'a RawValue>,
    /// Legacy completions prompt.
    #[serde(default, borrow)]
    pub prompt: Lenient<Input<'a>>,
}

impl<'a> RequestFields<'a> {
    /// Read a JSON body. Errors are the client's: broken JSON, or JSON that is not an object.
    pub fn parse(body: &'a [u8]) -> Result<Self, FieldsError> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            // Tell broken JSON from JSON of the wrong shape.
            return Err(match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => FieldsError::NotAnObject,
                Err(e) => FieldsError::Json(e),
            });
        }
        serde_json::from_slice(body).map_err(FieldsError::Json)
    }

    pub fn model(&self) -> Option<&str> {
        self.model.get().map(Text::as_str)
    }

    pub fn stream(&self) -> bool {
        self.stream.0 == Some(true)
    }

    /// The client asked for the stream's usage chunk itself.
    pub fn asks_stream_usage(&self) -> bool {
        self.stream_options
            .get()
            .is_some_and(|o| o.include_usage.0 == Some(true))
    }

    /// The output cap the client set: `max_completion_tokens`, else `max_tokens`, else
    /// (Responses) `max_output_tokens`.
    pub fn output_cap(&self) -> Option<u64> {
        self.max_completion_tokens
            .0
            .or(self.max_tokens.0)
            .or(self.max_output_tokens.0)
    }

    /// `input` as embeddings read it: text, token ids, or lists of them.
    pub fn embeddings_input(&self) -> Option<Input<'a>> {
        self.input
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// `input` as the Responses API reads it: text, or a list of items (messages).
    pub fn responses_input(&self) -> Option<ResponsesInput<'a>> {
        self.input
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }
}

#[derive(Debug)]
pub enum FieldsError {
    Json(serde_json::Error),
    NotAnObject,
}

#[derive(Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Lenient<bool>,
}

/// One chat message: what the published counting rule reads.
#[derive(Default, Deserialize)]
pub struct Message<'a> {
    #[serde(default, borrow)]
    pub role: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    pub name: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    pub content: Content<'a>,
}

/// A message's content: text, or parts (text and images).
#[derive(Default)]
pub enum Content<'a> {
    #[default]
    Absent,
    Text(Cow<'a, str>),
    Parts(Vec<Object<Part<'a>>>),
    /// Any other shape (the upstream decides what it means).
    Other,
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

/// An embeddings `input` or completions `prompt`: text, token ids, or lists of either.
pub enum Input<'a> {
    Text(Cow<'a, str>),
    /// A token id.
    Number,
    List(Vec<Input<'a>>),
    Other,
}

/// A Responses API `input`: one text, or items read like chat messages (role and content;
/// content parts of type `input_text`/`output_text` are text).
pub enum ResponsesInput<'a> {
    Text(Cow<'a, str>),
    Items(Vec<Object<Message<'a>>>),
}

impl<'de: 'a, 'a> Deserialize<'de> for ResponsesInput<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ResponsesInputVisitor(PhantomData))
    }
}

struct ResponsesInputVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ResponsesInputVisitor<'a> {
    type Value = ResponsesInput<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("text or a list of input items")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(ResponsesInput::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(ResponsesInput::Text(Cow::Owned(v.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(ResponsesInput::Items(items))
    }
}

/// A string, borrowed from the body unless it had escapes to undo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl Text<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A value of the expected type, or `None` for anything else (which is skipped whole).
/// For scalars and lists; objects are read by [`Object`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lenient<T>(pub Option<T>);

/// A JSON object read as `T`, or `None` for anything else. (Serde would also read a
/// struct from an array, by position; a message is never an array.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object<T>(pub Option<T>);

impl<T> Default for Object<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> Object<T> {
    pub fn get(&self) -> Option<&T> {
        self.0.as_ref()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectVisitor(PhantomData))
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Object<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Object(None))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Object(None))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Object(None))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Object(None))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Object(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Object(None))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Object(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Object(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let value = T::deserialize(MapAccessDeserializer::new(&mut map)).ok();
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Object(value))
    }
}

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> Lenient<T> {
    pub fn get(&self) -> Option<&T> {
        self.0.as_ref()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LenientVisitor(PhantomData))
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for LenientVisitor<T> {
    type Value = Lenient<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Lenient(
            T::deserialize(IntoDeserializer::<E>::into_deserializer(v)).ok(),
        ))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Lenient(
            T::deserialize(IntoDeserializer::<E>::into_deserializer(v)).ok(),
        ))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Lenient(
            T::deserialize(IntoDeserializer::<E>::into_deserializer(v)).ok(),
        ))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Lenient(
            T::deserialize(IntoDeserializer::<E>::into_deserializer(v)).ok(),
        ))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Lenient(
            T::deserialize(BorrowedStrDeserializer::<E>::new(v)).ok(),
        ))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Lenient(
            T::deserialize(IntoDeserializer::<E>::into_deserializer(v)).ok(),
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Lenient(None))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Lenient(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let value = T::deserialize(SeqAccessDeserializer::new(&mut seq)).ok();
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lenient(value))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let value = T::deserialize(MapAccessDeserializer::new(&mut map)).ok();
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lenient(value))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TextVisitor(PhantomData))
    }
}

struct TextVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(v)))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ContentVisitor(PhantomData))
    }
}

struct ContentVisitor<'a>(PhantomData<&'a ()>);

/// Scalars that are not text are "some other content"; null is no content.
macro_rules! other_scalars {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($other)
        }
    };
}

impl<'de: 'a, 'a> Visitor<'de> for ContentVisitor<'a> {
    type Value = Content<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("message content")
    }

    other_scalars!(Content::Other);

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Content::Absent)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Content::Absent)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Content::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Content::Text(Cow::Owned(v.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut parts = Vec::new();
        while let Some(part) = seq.next_element()? {
            parts.push(part);
        }
        Ok(Content::Parts(parts))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Input<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InputVisitor(PhantomData))
    }
}

struct InputVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for InputVisitor<'a> {
    type Value = Input<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("text, token ids, or a list of them")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Input::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Input::Number)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Input::Number)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Input::Number)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Input::Other)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Input::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Input::Text(Cow::Owned(v.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Input::List(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Input::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_unexpected_types_read_as_absent_and_the_rest_still_reads() {
        let body = br#"{"model": 7, "stream": "yes", "n": {"a": [1, {"b": 2}]},
            "max_tokens": -1, "max_completion_tokens": 12,
            "messages": [{"role": 1, "content": "Hi \"you\""}, "not a message",
                         {"role": "user", "content": [{"type": "text", "text": "x"}, 5]}],
            "stream_options": [true], "tools": [{"type": "function"}], "extra": {"deep": [[[]]]}}"#;
        let fields = RequestFields::parse(body).expect("valid JSON object");
        assert_eq!(fields.model(), None);
        assert!(!fields.stream());
        assert_eq!(fields.n.0, None);
        assert_eq!(fields.output_cap(), Some(12));
        assert!(!fields.asks_stream_usage());
        assert!(fields.tools.is_some());
        let messages = fields.messages.0.expect("messages");
        assert_eq!(messages.len(), 3);
        let first = messages[0].get().expect("an object");
        assert_eq!(first.role.0, None);
        assert!(matches!(&first.content, Content::Text(t) if t == "Hi \"you\""));
        assert!(messages[1].get().is_none());
        let third = messages[2].get().expect("an object");
        assert_eq!(third.role.get().map(Text::as_str), Some("user"));
        assert!(
            matches!(&third.content, Content::Parts(p) if p.len() == 2 && p[1].get().is_none())
        );
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
        let fields =
            RequestFields::parse(br#"{"model": "gpt-4o", "messages": [{"role": "u\u0073er"}]}"#)
                .unwrap();
        assert!(matches!(
            fields.model.0,
            Some(Text(Cow::Borrowed("gpt-4o")))
        ));
        let messages = fields.messages.0.unwrap();
        assert!(matches!(
            messages[0].get().unwrap().role.0,
            Some(Text(Cow::Owned(ref s))) if s == "user"
        ));
    }
}

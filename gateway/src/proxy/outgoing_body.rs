//! The body sent upstream: the client's bytes, held once, with the gateway's edits made as
//! byte splices (the v1 route's `model`, a stream's `include_usage`) rather than by
//! re-serializing a parsed tree. Each attempt sends the same shared bytes; only the edits
//! are new, so a 14 MiB body costs 14 MiB however many members are tried.

use std::collections::VecDeque;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::proxy::request_fields::{RequestFields, span_in};

/// The request body and where the gateway edits it.
#[derive(Clone, Debug, Default)]
pub struct OutgoingBody {
    bytes: Bytes,
    /// Where the body's `model` value lies: each member's deployment name goes there.
    model: Option<Range<usize>>,
    /// Fixed edits, in body order and not overlapping: replace the range with the text.
    edits: Vec<(Range<usize>, &'static str)>,
    /// The edit that asks a priority member for priority processing (`service_tier`), for
    /// JSON bodies the gateway read.
    priority: Option<(Range<usize>, &'static str)>,
}

impl OutgoingBody {
    /// Sent as received.
    pub fn unchanged(bytes: Bytes) -> Self {
        Self {
            bytes,
            ..Self::default()
        }
    }

    /// The body with `model` rewritten per member (the v1 route): `fields` were read from
    /// `bytes` and name a model.
    pub fn with_model(bytes: Bytes, fields: &RequestFields) -> Self {
        let model = fields.model.map(|raw| span_in(&bytes, raw));
        Self {
            bytes,
            model,
            ..Self::default()
        }
    }

    /// Where a priority member's attempt writes `"service_tier":"priority"`: over the
    /// client's value, else first in the object. `fields` were read from this body.
    pub fn mark_service_tier(&mut self, fields: &RequestFields) {
        self.priority = match fields.service_tier {
            Some(raw) => Some((span_in(&self.bytes, raw), r#""priority""#)),
            None => self.bytes.iter().position(|&b| b == b'{').map(|at| {
                let rest = &self.bytes[at + 1..];
                let empty = rest
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_none_or(|&b| b == b'}');
                let text = if empty {
                    r#""service_tier":"priority""#
                } else {
                    r#""service_tier":"priority","#
                };
                (at + 1..at + 1, text)
            }),
        };
    }

    /// Ask for a stream's usage chunk (`stream_options.include_usage = true`); false when
    /// the client already did, or its `stream_options` is not an object (the upstream
    /// rejects that one unchanged).
    pub fn request_stream_usage(&mut self, fields: &RequestFields) -> bool {
        let edit = match fields.stream_options {
            // The body is an object with `stream` in it: never empty.
            None => {
                let open = self.bytes.iter().position(|&b| b == b'{');
                open.map(|at| {
                    (
                        at + 1..at + 1,
                        r#""stream_options":{"include_usage":true},"#,
                    )
                })
            }
            Some(raw) => match fields.stream_options() {
                None => None,
                Some(options) => match options.include_usage {
                    Some(value) if value.get() == "true" => None,
                    Some(value) => Some((span_in(&self.bytes, value), "true")),
                    None => {
                        let span = span_in(&self.bytes, raw);
                        let inner = &self.bytes[span.start + 1..span.end - 1];
                        let at = span.start + 1;
                        Some(if inner.iter().all(u8::is_ascii_whitespace) {
                            (at..at, r#""include_usage":true"#)
                        } else {
                            (at..at, r#""include_usage":true,"#)
                        })
                    }
                },
            },
        };
        let Some(edit) = edit else {
            return false;
        };
        self.edits.push(edit);
        self.edits.sort_by_key(|(range, _)| range.start);
        true
    }

    /// The bytes for one attempt: `deployment` written as `model` when the body's model is
    /// rewritten, and `service_tier = "priority"` for a `priority` member. Shares the body's
    /// bytes (no copy).
    pub fn for_member(&self, deployment: &str, priority: bool) -> Chunks {
        let priority = self.priority.clone().filter(|_| priority);
        if self.model.is_none() && self.edits.is_empty() && priority.is_none() {
            return Chunks::one(self.bytes.clone());
        }
        let model = self.model.clone().map(|range| {
            let name = serde_json::to_string(deployment).expect("a string always serializes");
            (range, Bytes::from(name))
        });
        let mut edits: Vec<(Range<usize>, Bytes)> = self
            .edits
            .iter()
            .chain(&priority)
            .map(|(range, text)| (range.clone(), Bytes::from_static(text.as_bytes())))
            .chain(model)
            .collect();
        edits.sort_by_key(|(range, _)| range.start);
        let mut chunks = VecDeque::with_capacity(edits.len() * 2 + 1);
        let mut at = 0;
        for (range, text) in edits {
            chunks.push_back(self.bytes.slice(at..range.start));
            chunks.push_back(text);
            at = range.end;
        }
        chunks.push_back(self.bytes.slice(at..));
        chunks.retain(|c| !c.is_empty());
        Chunks::new(chunks)
    }

    /// The body as one contiguous copy, as an attempt sends it (tests).
    #[cfg(test)]
    pub fn to_vec(&self, deployment: &str, priority: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + 64);
        let mut at = 0;
        let mut edits: Vec<(Range<usize>, Vec<u8>)> = self
            .edits
            .iter()
            .chain(self.priority.iter().filter(|_| priority))
            .map(|(r, t)| (r.clone(), t.as_bytes().to_vec()))
            .chain(self.model.clone().map(|r| {
                (
                    r,
                    serde_json::to_vec(deployment).expect("a string always serializes"),
                )
            }))
            .collect();
        edits.sort_by_key(|(range, _)| range.start);
        for (range, text) in edits {
            out.extend_from_slice(&self.bytes[at..range.start]);
            out.extend_from_slice(&text);
            at = range.end;
        }
        out.extend_from_slice(&self.bytes[at..]);
        out
    }
}

/// A body of shared chunks with its exact length known (sent with `content-length`).
pub struct Chunks {
    /// The body unedited (most requests): one chunk, no queue to allocate.
    whole: Option<Bytes>,
    chunks: VecDeque<Bytes>,
    left: u64,
}

impl Chunks {
    fn one(bytes: Bytes) -> Self {
        Self {
            left: bytes.len() as u64,
            whole: (!bytes.is_empty()).then_some(bytes),
            chunks: VecDeque::new(),
        }
    }

    fn new(chunks: VecDeque<Bytes>) -> Self {
        let left = chunks.iter().map(|c| c.len() as u64).sum();
        Self {
            whole: None,
            chunks,
            left,
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let next = match self.whole.take() {
            Some(whole) => Some(whole),
            None => self.chunks.pop_front(),
        };
        if let Some(chunk) = &next {
            self.left -= chunk.len() as u64;
        }
        Poll::Ready(next.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.whole.is_none() && self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edited(body: &str, usage: bool, model: bool) -> (String, bool) {
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let fields = RequestFields::parse(&bytes).unwrap();
        let mut out = if model {
            OutgoingBody::with_model(bytes.clone(), &fields)
        } else {
            OutgoingBody::unchanged(bytes.clone())
        };
        let asked = usage && out.request_stream_usage(&fields);
        let text = String::from_utf8(out.to_vec("gpt-4o-east", false)).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).expect("still JSON");
        (text, asked)
    }

    #[test]
    fn the_model_is_replaced_in_place() {
        let (text, _) = edited(
            r#"{"model" : "gpt-4o", "messages":[{"role":"user","content":"model"}]}"#,
            false,
            true,
        );
        assert_eq!(
            text,
            r#"{"model" : "gpt-4o-east", "messages":[{"role":"user","content":"model"}]}"#
        );
    }

    #[test]
    fn stream_usage_is_asked_for_in_every_shape() {
        let cases = [
            (
                r#"{"stream":true}"#,
                r#"{"stream_options":{"include_usage":true},"stream":true}"#,
                true,
            ),
            (
                r#"{"stream":true,"stream_options":{}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
                true,
            ),
            (
                r#"{"stream":true,"stream_options":{ "x": 1 }}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true, "x": 1 }}"#,
                true,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
                true,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
                false,
            ),
            (
                r#"{"stream":true,"stream_options":null}"#,
                r#"{"stream":true,"stream_options":null}"#,
                false,
            ),
        ];
        for (body, expected, asked) in cases {
            assert_eq!(
                edited(body, true, false),
                (expected.to_owned(), asked),
                "{body}"
            );
        }
    }

    #[test]
    fn both_edits_together_keep_the_rest() {
        let (text, asked) = edited(
            r#"{"stream":true,"model":"gpt-4o","messages":[]}"#,
            true,
            true,
        );
        assert!(asked);
        assert_eq!(
            text,
            r#"{"stream_options":{"include_usage":true},"stream":true,"model":"gpt-4o-east","messages":[]}"#
        );
    }

    #[test]
    fn a_priority_member_is_asked_for_priority_processing_and_others_get_the_body_as_sent() {
        let cases = [
            (
                r#"{"messages":[]}"#,
                r#"{"service_tier":"priority","messages":[]}"#,
            ),
            (
                r#"{"service_tier" : "auto","messages":[]}"#,
                r#"{"service_tier" : "priority","messages":[]}"#,
            ),
            (r#"{ }"#, r#"{"service_tier":"priority" }"#),
        ];
        for (body, expected) in cases {
            let bytes = Bytes::copy_from_slice(body.as_bytes());
            let fields = RequestFields::parse(&bytes).unwrap();
            let mut out = OutgoingBody::unchanged(bytes.clone());
            out.mark_service_tier(&fields);
            let priority = String::from_utf8(out.to_vec("d", true)).unwrap();
            assert_eq!(priority, expected);
            serde_json::from_str::<serde_json::Value>(&priority).expect("still JSON");
            assert_eq!(out.to_vec("d", false), body.as_bytes(), "a standard member");
        }
    }

    #[tokio::test]
    async fn an_attempt_sends_the_edited_bytes_with_their_length() {
        use http_body_util::BodyExt;
        let bytes = Bytes::from_static(br#"{"model":"a","stream":true}"#);
        let fields = RequestFields::parse(&bytes).unwrap();
        let mut out = OutgoingBody::with_model(bytes.clone(), &fields);
        out.request_stream_usage(&fields);
        let expected = out.to_vec("deployment", false);
        let body = out.for_member("deployment", false);
        assert_eq!(
            http_body::Body::size_hint(&body).exact(),
            Some(expected.len() as u64)
        );
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(sent, expected);
    }
}

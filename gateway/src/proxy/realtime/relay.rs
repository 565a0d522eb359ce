//! A Realtime session once open: frames relayed both ways, client events held to the
//! consumer's limits, each completed response charged.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{self, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_tungstenite::tungstenite::{self, Message};

use super::super::{consumer_budget, consumer_quota};
use super::Session;
use crate::auth::consumers::Consumer;
use crate::error::GatewayError;
use crate::proxy::Gateway;
use crate::proxy::request_fields::{Lenient, Object, Text};

/// Relay frames both ways until either side closes; charge each completed response. Client
/// events pass the consumer's limits first (see [`admit_event`]).
pub(super) async fn relay(
    client: WebSocket,
    session: Session,
    gateway: Arc<Gateway>,
    _slot: Option<OwnedSemaphorePermit>,
) {
    let Session {
        upstream,
        charges,
        consumer,
    } = session;
    let (mut to_upstream, mut from_upstream) = upstream.split();
    let (mut to_client, mut from_client) = client.split();
    // The consumer's output cap is the session's from the start.
    let cap = consumer.as_ref().and_then(|c| c.max_tokens);
    if let Some(cap) = cap {
        let update = serde_json::json!({ "type": "session.update",
            "event_id": "evt_spillway_max_tokens",
            "session": { "max_response_output_tokens": cap } });
        if to_upstream
            .send(Message::Text(update.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    // Everything for the client goes through one writer: the upstream's events and the
    // gateway's own refusals. The upstream side holds the only strong sender, so the writer
    // ends (and closes the client) when the upstream does.
    let (to_writer, mut for_client) = mpsc::channel::<ws::Message>(64);
    let refusals = to_writer.downgrade();
    let (written, mut writer_done) = tokio::sync::watch::channel(false);
    let write_client = async {
        while let Some(message) = for_client.recv().await {
            let closing = matches!(message, ws::Message::Close(_));
            if to_client.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = to_client.close().await;
        written.send_replace(true);
    };
    let client_to_upstream = async {
        loop {
            let message = match from_client.next().await {
                Some(Ok(message)) => message,
                // Past `server.max_ws_message_bytes`: closed with 1009, said to the client.
                Some(Err(e)) if too_big(&e) => {
                    close_too_big(&refusals, &mut writer_done).await;
                    break;
                }
                Some(Err(_)) | None => break,
            };
            if let ws::Message::Text(text) = &message
                && let Err(refusal) = admit_event(&gateway, consumer.as_ref(), text.as_str()).await
            {
                let Some(writer) = refusals.upgrade() else {
                    break;
                };
                if writer.send(refusal).await.is_err() {
                    break;
                }
                continue;
            }
            let closing = matches!(message, ws::Message::Close(_));
            if to_upstream.send(upstream_message(message)).await.is_err() || closing {
                break;
            }
        }
        let _ = to_upstream.close().await;
    };
    let upstream_to_client = async move {
        while let Some(Ok(message)) = from_upstream.next().await {
            if let Message::Text(text) = &message
                && let Some(usage) = response_done_usage(text.as_str())
            {
                charges.charge(usage);
            }
            let Some(message) = client_message(message) else {
                continue;
            };
            let closing = matches!(message, ws::Message::Close(_));
            if to_writer.send(message).await.is_err() || closing {
                break;
            }
        }
    };
    tokio::select! {
        () = client_to_upstream => {}
        ((), ()) = async { tokio::join!(upstream_to_client, write_client) } => {}
    }
}

/// Close the client's side with 1009 (its message was past `server.max_ws_message_bytes`),
/// waiting a moment for the writer to say so.
async fn close_too_big(
    writer: &mpsc::WeakSender<ws::Message>,
    written: &mut tokio::sync::watch::Receiver<bool>,
) {
    let close = ws::Message::Close(Some(ws::CloseFrame {
        code: 1009,
        reason: "message larger than server.max_ws_message_bytes".into(),
    }));
    if let Some(writer) = writer.upgrade()
        && writer.send(close).await.is_ok()
    {
        drop(writer);
        let flushed = written.wait_for(|done| *done);
        let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
    }
}

/// A client message over the size limit (the WebSocket's capacity error).
fn too_big(error: &axum::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

/// What the gateway reads of a client event.
#[derive(Deserialize)]
struct ClientEvent<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    event_id: Lenient<Text<'a>>,
    #[serde(default)]
    session: Object<OutputCaps>,
    #[serde(default)]
    response: Object<OutputCaps>,
}

/// The output caps a `session.update` or `response.create` may set (`inf` or a count).
#[derive(Default, Deserialize)]
struct OutputCaps {
    #[serde(default)]
    max_response_output_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_output_tokens: Option<serde_json::Value>,
}

/// A client event passes when it is within the consumer's limits: a `session.update` or
/// `response.create` asks for no more output than its `max_tokens`, and a `response.create`
/// is admitted against its budget and quota (the response is charged when it is done).
/// Events the gateway cannot read pass unchanged (the upstream answers them).
async fn admit_event(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    text: &str,
) -> Result<(), ws::Message> {
    let Some(consumer) = consumer else {
        return Ok(());
    };
    if !text.contains("session.update") && !text.contains("response.create") {
        return Ok(());
    }
    let Ok(event) = serde_json::from_str::<ClientEvent>(text) else {
        return Ok(());
    };
    let kind = event.kind.get().map(Text::as_str);
    let client_event = event.event_id.get().map(|t| t.as_str().to_owned());
    let refuse = |code: &str, message: String, param: Option<&str>| {
        refusal_event(code, &message, param, client_event.as_deref())
    };
    if !matches!(kind, Some("session.update" | "response.create")) {
        return Ok(());
    }
    if let Some(cap) = consumer.max_tokens {
        let (object, caps) = match kind {
            Some("session.update") => ("session", event.session.get()),
            _ => ("response", event.response.get()),
        };
        for (field, asked) in caps.into_iter().flat_map(|c| {
            [
                ("max_response_output_tokens", &c.max_response_output_tokens),
                ("max_output_tokens", &c.max_output_tokens),
            ]
        }) {
            let Some(asked) = asked else { continue };
            if asked.as_u64().is_none_or(|n| n > cap) {
                return Err(refuse(
                    "max_tokens_exceeded",
                    format!("{object}.{field} may be at most {cap} for this key."),
                    Some(&format!("{object}.{field}")),
                ));
            }
        }
    }
    if kind != Some("response.create") {
        return Ok(());
    }
    // Unreachable fleet state is no refusal: the response is served (and charged when
    // done), as an HTTP request would be on the replica's own share.
    if let Err(GatewayError::QuotaExceeded { .. }) =
        consumer_quota::check(gateway, Some(consumer), || {}).await
    {
        return Err(refuse(
            "quota_exceeded",
            "This key's token quota for the period is used up; the session stays open.".into(),
            None,
        ));
    }
    if consumer_budget::spent(gateway, consumer).await {
        return Err(refuse(
            "rate_limit_exceeded",
            "This key's rate limit is reached; the session stays open. Please retry the response later."
                .into(),
            None,
        ));
    }
    Ok(())
}

/// A refused client event, answered in the Realtime API's error shape:
/// `{"type":"error","error":{"type":"invalid_request_error","code":…,"message":…,"param":…,
/// "event_id":<the client's event>}}`. Codes: `max_tokens_exceeded` (a cap above the key's
/// `max_tokens`), `rate_limit_exceeded` (its budget is spent for now), `quota_exceeded` (its
/// token quota is spent for the period).
fn refusal_event(
    code: &str,
    message: &str,
    param: Option<&str>,
    client_event: Option<&str>,
) -> ws::Message {
    let kind = if code == "max_tokens_exceeded" {
        "invalid_request_error"
    } else {
        "rate_limit_error"
    };
    let event = serde_json::json!({ "type": "error", "event_id": "evt_spillway_refusal",
        "error": { "type": kind, "code": code, "message": message, "param": param,
            "event_id": client_event } });
    ws::Message::Text(event.to_string().into())
}

/// A completed Realtime response's tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ResponseUsage {
    pub total: u64,
    pub input: u64,
    pub cached: u64,
    pub output: u64,
}

/// The usage of a `response.done` event, read without building the event.
fn response_done_usage(text: &str) -> Option<ResponseUsage> {
    #[derive(Deserialize)]
    struct Event {
        #[serde(rename = "type")]
        kind: String,
        response: Option<Done>,
    }
    #[derive(Deserialize)]
    struct Done {
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Usage {
        total_tokens: u64,
        #[serde(default)]
        input_tokens: u64,
        #[serde(default)]
        output_tokens: u64,
        #[serde(default)]
        input_token_details: Option<Details>,
    }
    #[derive(Deserialize)]
    struct Details {
        #[serde(default)]
        cached_tokens: u64,
    }
    if !text.contains("response.done") {
        return None;
    }
    let event: Event = serde_json::from_str(text).ok()?;
    let usage = event
        .response?
        .usage
        .filter(|_| event.kind == "response.done")?;
    Some(ResponseUsage {
        total: usage.total_tokens,
        input: usage.input_tokens,
        cached: usage.input_token_details.map_or(0, |d| d.cached_tokens),
        output: usage.output_tokens,
    })
}

fn upstream_message(message: ws::Message) -> Message {
    match message {
        ws::Message::Text(text) => Message::Text(text.as_str().into()),
        ws::Message::Binary(bytes) => Message::Binary(bytes),
        ws::Message::Ping(bytes) => Message::Ping(bytes),
        ws::Message::Pong(bytes) => Message::Pong(bytes),
        ws::Message::Close(frame) => {
            Message::Close(frame.map(|f| tungstenite::protocol::CloseFrame {
                code: f.code.into(),
                reason: f.reason.as_str().into(),
            }))
        }
    }
}

fn client_message(message: Message) -> Option<ws::Message> {
    Some(match message {
        Message::Text(text) => ws::Message::Text(text.as_str().into()),
        Message::Binary(bytes) => ws::Message::Binary(bytes),
        Message::Ping(bytes) => ws::Message::Ping(bytes),
        Message::Pong(bytes) => ws::Message::Pong(bytes),
        Message::Close(frame) => ws::Message::Close(frame.map(|f| ws::CloseFrame {
            code: f.code.into(),
            reason: f.reason.as_str().into(),
        })),
        Message::Frame(_) => return None,
    })
}

//! Load shedding: at most `server.max_concurrent_requests` data-plane requests at once per
//! replica, counting a streamed answer until its last byte; past the cap, 503 at once.
//!
//! tower's `ConcurrencyLimit` + `LoadShed` release their permit when the response head is
//! ready, which would let streams (the long part of LLM traffic) pile up unbounded; here the
//! permit travels inside the response body and is released when the body is done or dropped.
//! A WebSocket session (whose upgrade answer has an empty body) takes the slot from the
//! request ([`HeldSlot`]) and holds it until the session ends.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::GatewayError;

/// The replica's request slots.
#[derive(Clone, Debug)]
pub struct RequestSlots(Arc<Semaphore>);

impl RequestSlots {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }

    /// Slots free right now (for tests and metrics).
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// Resolves once a slot is free (without taking it).
    pub async fn freed(&self) {
        let _ = self.0.acquire().await;
    }
}

/// Run the rest of the stack in one of `slots`, or answer 503 at once (for middleware that
/// does its own work first, such as authentication).
pub async fn in_slot(slots: &RequestSlots, mut request: Request, next: Next) -> Response {
    let Ok(permit) = slots.0.clone().try_acquire_owned() else {
        crate::ops::metrics::request_shed();
        return GatewayError::Overloaded.into_response();
    };
    let slot = HeldSlot(Arc::new(Mutex::new(Some(permit))));
    request.extensions_mut().insert(slot.clone());
    next.run(request)
        .await
        .map(|body| Body::new(PermitBody { body, _slot: slot }))
}

/// A request's slot, in its extensions: whoever takes it holds the slot past the response
/// (a WebSocket session); otherwise the response body frees it when done.
#[derive(Clone, Debug)]
pub struct HeldSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl HeldSlot {
    /// The slot itself, to be held as long as the work it stands for.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().expect("slot lock").take()
    }
}

/// A response body that holds its request's slot until it is finished or dropped.
struct PermitBody {
    body: Body,
    /// Held for its `Drop`, which frees the slot (unless it was taken).
    _slot: HeldSlot,
}

impl HttpBody for PermitBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

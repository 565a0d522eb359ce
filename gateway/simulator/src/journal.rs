//! Every request a simulated resource received, as it arrived on the wire: tests assert what
//! reached "Azure" (paths, headers), including requests no route of the simulator serves.

use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// Requests kept per resource; older ones are dropped (a bound for long demos).
const KEPT: usize = 10_000;

/// One request as the resource saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedRequest {
    pub method: String,
    /// Path and query exactly as sent (still percent-encoded).
    pub path_and_query: String,
    /// Header names (lower case) and values, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl ReceivedRequest {
    pub fn header_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

#[derive(Clone, Debug, Default)]
pub struct Journal(Arc<Mutex<Vec<ReceivedRequest>>>);

impl Journal {
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.0.lock().expect("journal lock").clone()
    }

    fn push(&self, request: ReceivedRequest) {
        let mut kept = self.0.lock().expect("journal lock");
        if kept.len() >= KEPT {
            kept.remove(0);
        }
        kept.push(request);
    }
}

/// Middleware: write the request into the journal, then serve it.
pub async fn record(State(journal): State<Journal>, request: Request, next: Next) -> Response {
    let uri = request.uri();
    if uri.path().starts_with("/sim/") {
        return next.run(request).await; // the simulator's own controls
    }
    journal.push(ReceivedRequest {
        method: request.method().to_string(),
        path_and_query: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), ToString::to_string),
        headers: request
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    });
    next.run(request).await
}

//! The routers: the data plane (`app`: who is calling, then the proxy) and the admin
//! listener (`admin`). What every request reads is `proxy::Gateway`.

mod models; // `GET /openai/models`

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use subtle::ConstantTimeEq;

use crate::edge::load_shed::{self, RequestSlots};
use crate::error::GatewayError;
use crate::live::{Current, Live};
use crate::proxy::{self, Gateway, Inbound};

/// Who is calling: the consumer its credential names (`None` on a gateway that
/// authenticates no one), settled once per request by [`identify`].
#[derive(Clone, Debug)]
pub struct Caller(pub Option<crate::auth::consumers::Consumer>);

/// Authenticate the request (401 in Azure's shape otherwise) and hand the consumer on, then
/// take one of the replica's request slots (503 when none is free): in that order, so
/// requests with bad credentials (a flood of junk tokens while the JWKS endpoint is slow)
/// never hold one. One layer for both, as every API request passes it.
async fn identify(
    State((live, slots)): State<(Arc<Live>, RequestSlots)>,
    mut request: Request,
    next: Next,
) -> Response {
    let gateway = live.get();
    let started = std::time::Instant::now();
    match gateway.consumers.authenticate(request.headers()).await {
        Ok(consumer) => {
            let caller = Caller(consumer.cloned());
            request.extensions_mut().insert(caller);
            load_shed::in_slot(&slots, request, next).await
        }
        Err(refusal) => {
            crate::ops::access_log::write(&crate::ops::access_log::AccessRecord {
                consumer: None,
                pool: None,
                backend: None,
                tier: None,
                attempts: 0,
                status: refusal.status().as_u16(),
                tokens: None,
                latency: started.elapsed(),
                time_to_first_token: None,
                error: Some(refusal.code()),
                class: None,
                shadow: None,
            });
            // Like every data-plane answer: which backend (none) after how many attempts.
            let mut response = refusal.into_response();
            let headers = response.headers_mut();
            headers.insert("x-spillway-backend", HeaderValue::from_static("none"));
            headers.insert("x-spillway-attempts", HeaderValue::from(0u32));
            response
        }
    }
}

/// The data-plane router: the Azure OpenAI and OpenAI v1 APIs plus health probes.
/// API requests take one of the replica's request slots (503 when none is free); the
/// probes do not, so a replica at its limit still answers them.
pub fn app(gateway: Arc<Gateway>) -> Router {
    app_live(Live::fixed(gateway))
}

/// [`app`], serving whichever configuration `live` holds when each request arrives.
pub fn app_live(live: Arc<Live>) -> Router {
    let slots = live.get().slots.clone();
    let mut api = Router::new()
        .route(
            "/openai/deployments/{pool}/{*operation}",
            post(deployment).fallback(method_not_allowed),
        )
        .route("/openai/realtime", get(realtime).fallback(get_only))
        // The Responses API's deployment-less preview form (`?api-version=...`).
        .route("/openai/responses", post(v1).fallback(method_not_allowed));
    // The v1 API, under both of its prefixes.
    for prefix in ["/openai/v1", "/v1"] {
        api = api
            .route(
                &format!("{prefix}/{{*operation}}"),
                post(v1).fallback(method_not_allowed),
            )
            .route(
                &format!("{prefix}/models"),
                get(models_list).fallback(get_only),
            )
            .route(
                &format!("{prefix}/models/{{model}}"),
                get(models_retrieve).fallback(get_only),
            )
            .route(
                &format!("{prefix}/realtime"),
                get(realtime_v1).fallback(get_only),
            );
    }
    // A stored response's own paths, on the v1 API and on the preview form.
    for responses in ["/openai/v1/responses", "/v1/responses", "/openai/responses"] {
        api = api
            .route(
                &format!("{responses}/{{id}}"),
                get(stored_response)
                    .delete(stored_response)
                    .fallback(get_or_delete_only),
            )
            .route(
                &format!("{responses}/{{id}}/input_items"),
                get(stored_response).fallback(get_only),
            )
            .route(
                &format!("{responses}/{{id}}/cancel"),
                post(stored_response).fallback(method_not_allowed),
            );
    }
    let api =
        api.fallback(|| async { GatewayError::NotFound })
            .layer(middleware::from_fn_with_state(
                (live.clone(), slots),
                identify,
            ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .with_state(live)
}

/// The admin router (operators only, `server.admin_listen`): Prometheus metrics and a probe.
/// With `server.admin_token_env` set, everything but `/healthz` needs the bearer token.
pub fn admin(gateway: Arc<Gateway>) -> Router {
    admin_live(Live::fixed(gateway))
}

/// [`admin`] for a reloadable configuration, with `POST /admin/reload`.
pub fn admin_live(live: Arc<Live>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|Current(g): Current| async move {
                crate::ops::metrics::render(&*g.fleet, &g.table).await
            }),
        )
        .route("/admin/state", get(admin_state))
        .route("/admin/cost", get(admin_cost))
        .route(
            "/admin/config",
            get(
                |Current(g): Current| async move { axum::Json(crate::config::redacted(&g.config)) },
            ),
        )
        .route("/admin/reload", post(admin_reload))
        .route_layer(middleware::from_fn_with_state(
            live.clone(),
            require_admin_token,
        ))
        .route("/healthz", get(|| async { "ok" }))
        // Outermost: a page on another site reaching the listener through DNS rebinding
        // names its own host, and is refused before anything else.
        .layer(middleware::from_fn_with_state(live.clone(), admin_host))
        .with_state(live)
}

/// The admin listener answers requests addressed to it: by an IP address (Prometheus, the
/// kubelet, `curl 127.0.0.1`), as `localhost`, or by a name in `server.admin_hosts`. Any
/// other `Host` is a name someone else controls (DNS rebinding): 403.
async fn admin_host(State(live): State<Arc<Live>>, request: Request, next: Next) -> Response {
    let host = request
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            let value = request.headers().get(axum::http::header::HOST)?;
            let authority: axum::http::uri::Authority = value.to_str().ok()?.parse().ok()?;
            Some(authority.host().to_owned())
        });
    let allowed = host.as_deref().is_none_or(|host| {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok()
            || bare.eq_ignore_ascii_case("localhost")
            || live
                .get()
                .config
                .server
                .admin_hosts
                .iter()
                .any(|name| name.eq_ignore_ascii_case(bare))
    });
    if allowed {
        next.run(request).await
    } else {
        GatewayError::AdminHost.into_response()
    }
}

/// `POST /admin/reload`: as SIGHUP; 200, or 400 with what is wrong (the running
/// configuration stays). It takes `content-type: application/json` (a body of `{}` or
/// none): a web page can send a form or text across sites without asking, never JSON.
async fn admin_reload(State(live): State<Arc<Live>>, headers: HeaderMap) -> Response {
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return GatewayError::NotJson.into_response();
    }
    match live.reload() {
        Ok(()) => axum::Json(serde_json::json!({ "reloaded": true })).into_response(),
        Err(problem) => (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({
                "error": { "code": "invalid_configuration", "message": problem }
            })),
        )
            .into_response(),
    }
}

/// `GET /admin/cost?since=24h`: `spillway cost --json`, from this replica's fleet state.
async fn admin_cost(
    Current(gateway): Current,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let since = match query.get("since").map(|s| humantime::parse_duration(s)) {
        None => std::time::Duration::from_secs(24 * 3600),
        Some(Ok(since)) => since,
        Some(Err(e)) => {
            return GatewayError::BadRequest(format!("since: {e} (e.g. 24h, 7d)")).into_response();
        }
    };
    match crate::cost::report::read(&*gateway.fleet, &gateway.prices, since).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => GatewayError::from(e).into_response(),
    }
}

/// `GET /admin/state`: `spillway state --json`, from this replica.
async fn admin_state(Current(gateway): Current) -> Response {
    match crate::ops::state_table::collect(
        &gateway.table,
        &*gateway.fleet,
        gateway.config.state.window_ms,
    )
    .await
    {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => GatewayError::from(e).into_response(),
    }
}

async fn require_admin_token(
    State(live): State<Arc<Live>>,
    request: Request,
    next: Next,
) -> Response {
    let gateway = live.get();
    let Some(expected) = &gateway.admin_token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(expected.expose().as_bytes())) {
        next.run(request).await
    } else {
        GatewayError::AdminUnauthorized.into_response()
    }
}

async fn method_not_allowed() -> GatewayError {
    GatewayError::MethodNotAllowed { allow: "POST" }
}

async fn get_only() -> GatewayError {
    GatewayError::MethodNotAllowed { allow: "GET" }
}

async fn get_or_delete_only() -> GatewayError {
    GatewayError::MethodNotAllowed {
        allow: "GET, DELETE",
    }
}

async fn readyz(Current(gateway): Current) -> Response {
    if gateway.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down").into_response();
    }
    match gateway.fleet.ping().await {
        Ok(()) => (
            StatusCode::OK,
            format!("ready (state: {})", gateway.fleet.describe()),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn deployment(
    Current(gateway): Current,
    Extension(Caller(consumer)): Extension<Caller>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Pool and operation are taken from the raw path, still encoded: admission validates
    // both before anything is decoded or forwarded.
    let (pool, operation) = uri
        .path()
        .strip_prefix("/openai/deployments/")
        .and_then(|rest| rest.split_once('/'))
        .unwrap_or_default();
    let inbound = Inbound {
        consumer,
        pool: Some(pool.to_owned()),
        operation: operation.to_owned(),
        query,
        method: Method::POST,
        stored: false,
        preview: false,
        headers,
        body,
    };
    proxy::handle(&gateway, inbound).await
}

async fn v1(
    Current(gateway): Current,
    Extension(Caller(consumer)): Extension<Caller>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let inbound = v1_inbound(consumer, Method::POST, &uri, query, headers, body, false);
    proxy::handle(&gateway, inbound).await
}

/// `GET`/`DELETE /openai/v1/responses/{id}`, `GET .../input_items`, `POST .../cancel`:
/// answered by the member holding the response, found in the fleet's affinity record.
async fn stored_response(
    Current(gateway): Current,
    Extension(Caller(consumer)): Extension<Caller>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let inbound = v1_inbound(consumer, method, &uri, query, headers, body, true);
    proxy::handle(&gateway, inbound).await
}

/// `GET /openai/realtime?api-version=...&deployment=<pool>`, upgraded to a WebSocket.
async fn realtime(
    gateway: Current,
    caller: Extension<Caller>,
    query: RawQuery,
    headers: HeaderMap,
    slot: Option<Extension<crate::edge::load_shed::HeldSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    realtime_session(false, gateway, caller, query, headers, slot, upgrade).await
}

/// `GET /openai/v1/realtime?model=<pool>`, upgraded to a WebSocket.
async fn realtime_v1(
    gateway: Current,
    caller: Extension<Caller>,
    query: RawQuery,
    headers: HeaderMap,
    slot: Option<Extension<crate::edge::load_shed::HeldSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    realtime_session(true, gateway, caller, query, headers, slot, upgrade).await
}

async fn realtime_session(
    v1: bool,
    Current(gateway): Current,
    Extension(Caller(consumer)): Extension<Caller>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    slot: Option<Extension<crate::edge::load_shed::HeldSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return GatewayError::UpgradeRequired.into_response();
    };
    let session = proxy::RealtimeRequest {
        v1,
        query,
        headers,
        consumer,
        slot: slot.map(|Extension(slot)| slot),
    };
    proxy::realtime(gateway, upgrade, session).await
}

async fn models_list(
    Current(gateway): Current,
    Extension(Caller(consumer)): Extension<Caller>,
) -> Response {
    models::list(&gateway, consumer.as_ref()).into_response()
}

async fn models_retrieve(
    Current(gateway): Current,
    Extension(Caller(consumer)): Extension<Caller>,
    axum::extract::Path(model): axum::extract::Path<String>,
) -> Response {
    models::retrieve(&gateway, consumer.as_ref(), &model).into_response()
}

/// A request on the v1 API: the operation is the path after `/openai/v1/` or `/v1/`; or on
/// the Responses API's preview form, after `/openai/` (`responses...`).
fn v1_inbound(
    consumer: Option<crate::auth::consumers::Consumer>,
    method: Method,
    uri: &Uri,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
    stored: bool,
) -> Inbound {
    let path = uri.path();
    let v1 = path
        .strip_prefix("/openai/v1/")
        .or_else(|| path.strip_prefix("/v1/"));
    let preview = v1.is_none();
    let operation = v1
        .or_else(|| path.strip_prefix("/openai/"))
        .unwrap_or_default()
        .to_owned();
    Inbound {
        consumer,
        pool: None,
        operation,
        query,
        method,
        stored,
        preview,
        headers,
        body,
    }
}

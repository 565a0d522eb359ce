//! Properties of the data plane under arbitrary requests (proptest): whatever the method,
//! path, headers and body, the gateway answers (no panic, no dropped connection, no 500),
//! every refusal is Azure's JSON error shape (`{"error":{"code":..,"message":..}}`), and no reservation is left open: once the
//! answers are read, every admitted request has been settled, and the fleet state holds
//! exactly the tokens the deployment served.

use std::sync::Arc;

use proptest::prelude::*;
use spillway_shared::EmbeddedState;
use spillway_tests::*;

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("chat".to_string()),
        Just("completions".to_string()),
        Just("embeddings".to_string()),
        Just("responses".to_string()),
        Just("..".to_string()),
        Just("%2e%2e".to_string()),
        Just("%2F".to_string()),
        Just("".to_string()),
        "[a-z0-9._%;\\\\-]{1,12}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    let prefix = prop_oneof![
        Just("/openai/deployments/gpt-4o/"),
        Just("/openai/deployments/"),
        Just("/openai/v1/"),
        Just("/v1/"),
        Just("/openai/"),
        Just("/"),
    ];
    let query = prop_oneof![
        Just(""),
        Just("?api-version=2024-10-21"),
        Just("?api-version="),
        Just("?%zz=1&&=")
    ];
    (prefix, prop::collection::vec(segment(), 0..4), query)
        .prop_map(|(prefix, segments, query)| format!("{prefix}{}{query}", segments.join("/")))
}

/// JSON of any shape, shallow.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A chat body with each known field replaced, dropped, or kept.
fn chat_like() -> impl Strategy<Value = Vec<u8>> {
    let field = |name: &'static str| {
        prop_oneof![
            2 => Just(None),
            1 => json().prop_map(move |v| Some((name, v))),
        ]
    };
    (
        field("messages"),
        field("max_tokens"),
        field("n"),
        field("stream"),
        field("stream_options"),
        field("model"),
        field("input"),
        field("tools"),
    )
        .prop_map(|fields| {
            let mut body = chat_body(false);
            let (a, b, c, d, e, f, g, h) = fields;
            for (name, value) in [a, b, c, d, e, f, g, h].into_iter().flatten() {
                body[name] = value;
            }
            body.to_string().into_bytes()
        })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => chat_like(),
        1 => json().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn method() -> impl Strategy<Value = reqwest::Method> {
    prop_oneof![
        6 => Just(reqwest::Method::POST),
        1 => Just(reqwest::Method::GET),
        1 => Just(reqwest::Method::DELETE),
        1 => Just(reqwest::Method::PUT),
    ]
}

#[test]
fn no_request_panics_breaks_the_error_shape_or_leaks_a_reservation() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let (sim, gw) = runtime.block_on(async {
        let sim = tiers_a_and_b().await;
        let gw = start_gateway(&backend(&sim, "a", 1), fleet.clone()).await;
        (sim, gw)
    });
    let http = client();
    let config = ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(method in method(), path in path(), body in body(), json_type in any::<bool>())| {
        let (status, text) = runtime.block_on(async {
            let mut request = http.request(method.clone(), format!("{}{path}", gw.url)).body(body.clone());
            if json_type {
                request = request.header("content-type", "application/json");
            }
            let response = request.send().await.expect("the gateway answers every request");
            let status = response.status().as_u16();
            (status, response.text().await.expect("the whole answer arrives"))
        });
        prop_assert_ne!(status, 500, "{} {} -> {}", method, path, text);
        if status >= 400 {
            let error: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("{method} {path} -> {status} not JSON ({e}): {text}")))?;
            // The code is the gateway's own, or the deployment's (Azure sends `null` for some).
            prop_assert!(
                error["error"]["message"].is_string() && error["error"].get("code").is_some(),
                "{} {} -> {} {}", method, path, status, text
            );
        }
    });
    runtime.block_on(async {
        let admitted = fleet.all_settled().await;
        assert!(admitted > 0, "some requests were admitted");
        let served = sim.stats("a", "gpt-4o");
        let (tokens, _) = charged(&*fleet, "a").await;
        assert_eq!(
            tokens, served.total_tokens,
            "the fleet holds what was served, no estimate left behind ({admitted} admitted, {} served)",
            served.requests
        );
    });
}

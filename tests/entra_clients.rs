//! Entra ID (JWT) clients: a token signed by the tenant's keys (a JWKS fetched from a loopback
//! endpoint), from the configured issuer, for the gateway's audience and within its lifetime,
//! names its application (`azp`, or `appid` in v1 tokens), which maps to a consumer with
//! that consumer's limits. Everything else is the same 401. A token signed with a key the
//! gateway has not seen yet refreshes the key set once, so Entra's key rollover costs no
//! request; made-up key ids do not become a flood of fetches.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use spillway_tests::pki::{Pki, SigningKey, base64url};
use spillway_tests::*;

const ISSUER: &str = "https://login.microsoftonline.com/tenant-1/v2.0";
const AUDIENCE: &str = "api://spillway";
const APP: &str = "11111111-aaaa-4bbb-8ccc-000000000001";

#[derive(Default)]
struct Jwks {
    document: Mutex<Value>,
    fetches: AtomicU32,
}

fn jwk(kid: &str, key: &SigningKey) -> Value {
    json!({ "kty": "RSA", "use": "sig", "kid": kid, "n": key.modulus, "e": "AQAB" })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims of a valid v2 token for `APP`, to be spoiled by each case.
fn claims() -> Value {
    json!({ "iss": ISSUER, "aud": AUDIENCE, "azp": APP, "iat": now(), "nbf": now(), "exp": now() + 600 })
}

fn sign(kid: &str, key: &SigningKey, claims: &Value) -> String {
    let header = Header {
        kid: Some(kid.into()),
        ..Header::new(Algorithm::RS256)
    };
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(&key.pem).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_tokens_name_consumers_and_nothing_else_gets_in() {
    let pki = Pki::new("jwt");
    let (first, second, stranger) = (
        pki.signing_key("first"),
        pki.signing_key("second"),
        pki.signing_key("stranger"),
    );
    let jwks = Arc::new(Jwks::default());
    *jwks.document.lock().unwrap() = json!({ "keys": [jwk("first", &first)] });
    let keys_url = {
        let jwks = jwks.clone();
        let app = axum::Router::new().route(
            "/discovery/v2.0/keys",
            axum::routing::get(move || {
                let jwks = jwks.clone();
                async move {
                    jwks.fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(jwks.document.lock().unwrap().clone())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/discovery/v2.0/keys",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    };

    let sim = tiers_a_and_b().await;
    // Pool `other` is served too, but not to this consumer.
    let config = backend(&sim, "a", 1)
        + &backend(&sim, "b", 1).replace("\"gpt-4o\" = ", "\"other\" = ")
        + &format!(
            "[auth.jwt]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\njwks_url = \"{keys_url}\"\n\
             [[consumers]]\nname = \"chat-app\"\nclient_id = \"{APP}\"\npools = [\"gpt-4o\"]\n\
             [[consumers]]\nname = \"keyed\"\nkey_sha256 = \"{}\"\n",
            spillway_gateway::auth::consumers::key_sha256_hex("plain-key")
        );
    let gw = start_single(&config).await;
    let send = |bearer: String, pool: &'static str| {
        client()
            .post(format!(
                "{}/openai/deployments/{pool}/chat/completions?api-version=2024-10-21",
                gw.url
            ))
            .bearer_auth(bearer)
            .json(&chat_body(false))
            .send()
    };

    // A valid token is the consumer it names, with its limits (only pool gpt-4o).
    let token = sign("first", &first, &claims());
    assert_eq!(send(token.clone(), "gpt-4o").await.unwrap().status(), 200);
    let other_pool = send(token.clone(), "other").await.unwrap();
    assert_eq!(other_pool.status(), 404, "the consumer's pools apply");
    // A v1 token names its application in `appid`; a token 10 s past `exp` is in the leeway.
    let mut v1 = claims();
    v1.as_object_mut().unwrap().remove("azp");
    v1["appid"] = json!(APP);
    v1["exp"] = json!(now() - 10);
    assert_eq!(
        send(sign("first", &first, &v1), "gpt-4o")
            .await
            .unwrap()
            .status(),
        200
    );
    // Keys still work beside tokens.
    assert_eq!(
        send("plain-key".into(), "gpt-4o").await.unwrap().status(),
        200
    );

    // Everything else: the same 401, whatever is wrong.
    let spoiled = |field: &str, value: Value| {
        let mut c = claims();
        c[field] = value;
        sign("first", &first, &c)
    };
    let mut no_client = claims();
    no_client.as_object_mut().unwrap().remove("azp");
    let header_none = base64url(br#"{"alg":"none","typ":"JWT","kid":"first"}"#);
    let unsigned = format!(
        "{header_none}.{}.",
        base64url(claims().to_string().as_bytes())
    );
    let cases = [
        ("expired", spoiled("exp", json!(now() - 120))),
        ("not yet valid", spoiled("nbf", json!(now() + 600))),
        (
            "another audience",
            spoiled("aud", json!("api://someone-else")),
        ),
        (
            "another issuer",
            spoiled("iss", json!("https://login.microsoftonline.com/evil/v2.0")),
        ),
        (
            "an application that is no consumer",
            spoiled("azp", json!("22222222-unknown")),
        ),
        ("no client claim", sign("first", &first, &no_client)),
        (
            "signed by a stranger under a known kid",
            sign("first", &stranger, &claims()),
        ),
        ("alg none", unsigned),
        ("a tampered payload", {
            let token = sign("first", &first, &claims());
            let parts: Vec<&str> = token.split('.').collect();
            let mut c = claims();
            c["azp"] = json!(APP);
            c["exp"] = json!(now() + 86_400 * 365);
            format!(
                "{}.{}.{}",
                parts[0],
                base64url(c.to_string().as_bytes()),
                parts[2]
            )
        }),
    ];
    let mut bodies = Vec::new();
    for (case, token) in cases {
        let refused = send(token, "gpt-4o").await.unwrap();
        assert_eq!(refused.status(), 401, "{case}");
        bodies.push(refused.text().await.unwrap());
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "one answer for every refusal: {bodies:?}"
    );
    assert!(bodies[0].contains("\"code\":\"401\""), "{}", bodies[0]);
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1, "one fetch so far");

    // Key rollover: a token signed with a key published since is accepted at once.
    *jwks.document.lock().unwrap() =
        json!({ "keys": [jwk("first", &first), jwk("second", &second)] });
    let rolled = sign("second", &second, &claims());
    assert_eq!(send(rolled, "gpt-4o").await.unwrap().status(), 200);
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
    // Made-up key ids right after: refused, with no fetch each.
    for i in 0..5 {
        let token = sign(&format!("made-up-{i}"), &stranger, &claims());
        assert_eq!(send(token, "gpt-4o").await.unwrap().status(), 401);
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        2,
        "forced fetches are rate-limited"
    );
    assert_eq!(
        sim.stats("a", "gpt-4o").requests,
        4,
        "refusals never go upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_can_come_from_a_file_and_a_bad_file_stops_the_start() {
    let pki = Pki::new("jwks-file");
    let key = pki.signing_key("only");
    let file = pki.path("jwks.json");
    std::fs::write(&file, json!({ "keys": [jwk("only", &key)] }).to_string()).unwrap();
    let sim = tiers_a_and_b().await;
    let config = |path: &std::path::Path| {
        backend(&sim, "a", 1)
            + &format!(
                "[auth.jwt]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\njwks_file = \"{}\"\n\
                 [[consumers]]\nname = \"chat-app\"\nclient_id = \"{APP}\"\n",
                path.display()
            )
    };
    let gw = start_single(&config(&file)).await;
    let answer = client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            gw.url
        ))
        .bearer_auth(sign("only", &key, &claims()))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    std::fs::write(&file, "not json").unwrap();
    let parsed = spillway_gateway::config::Config::from_toml(&config(&file)).unwrap();
    let fleet = Arc::new(spillway_shared::EmbeddedState::default());
    let err = spillway_gateway::proxy::Gateway::from_config(&parsed, fleet)
        .err()
        .expect("an unreadable key set stops the start")
        .to_string();
    assert!(
        err.contains("auth.jwt") && err.contains("not a JWKS"),
        "{err}"
    );
}

/// Junk tokens while the key set cannot be had (the JWKS endpoint accepts connections and
/// never answers): one fetch is tried, not one per token, and however many such requests wait
/// for it, none holds a request slot, so keyed clients are still served. The slot count is
/// the point here (2), the rest is the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tokens_while_the_jwks_endpoint_hangs_cost_one_fetch_and_no_slot() {
    let pki = Pki::new("jwt-hang");
    let stranger = pki.signing_key("stranger");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let keys_url = format!("http://{}/keys", listener.local_addr().unwrap());
    let (connected, mut connections) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket); // read nothing, answer nothing
            connected.send_replace(held.len() as u32);
        }
    });
    let sim = tiers_a_and_b().await;
    let config = "[server]\nmax_concurrent_requests = 2\n".to_owned()
        + &backend(&sim, "a", 1)
        + &format!(
            "[auth.jwt]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\njwks_url = \"{keys_url}\"\n\
             [[consumers]]\nname = \"chat-app\"\nclient_id = \"{APP}\"\n\
             [[consumers]]\nname = \"keyed\"\nkey_sha256 = \"{}\"\n",
            spillway_gateway::auth::consumers::key_sha256_hex("plain-key")
        );
    let gw = start_single(&config).await;
    let url = format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        gw.url
    );
    let junk: Vec<_> = (0..8)
        .map(|i| {
            let request = client()
                .post(&url)
                .bearer_auth(sign(&format!("made-up-{i}"), &stranger, &claims()))
                .json(&chat_body(false))
                .send();
            tokio::spawn(request)
        })
        .collect();
    tokio::time::timeout(EVENT_TIMEOUT, connections.wait_for(|&n| n >= 1))
        .await
        .expect("the key set is asked for")
        .unwrap();
    assert_eq!(
        gw.gateway.slots.available(),
        2,
        "waiting junk holds no slot"
    );
    for _ in 0..3 {
        assert_eq!(chat_as(&gw, "plain-key").await.unwrap().status(), 200);
    }
    for request in junk {
        assert_eq!(request.await.unwrap().unwrap().status(), 401);
    }
    assert_eq!(*connections.borrow(), 1, "one fetch for every junk token");
}

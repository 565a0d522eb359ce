//! Header hygiene: upstream receives an allow-list of the client's headers (never cookies,
//! client credentials or forwarding headers unless configured), and the client never sees
//! the upstream's cookies or headers naming the backend's host.
//! Its own test binary because it sets environment variables.

use std::sync::Once;

use spillway_gateway::sim::{DeploymentKind, Faults, SimHandle};
use spillway_tests::*;

const CLIENT_KEY: &str = "hygiene-client-key";
const BACKEND_KEY: &str = "hygiene-backend-key";

fn set_keys() {
    static ONCE: Once = Once::new();
    // SAFETY: set once, before any test in this binary reads the environment.
    ONCE.call_once(|| unsafe {
        std::env::set_var("SPILLWAY_HYGIENE_CLIENT_KEY", CLIENT_KEY);
        std::env::set_var("SPILLWAY_HYGIENE_BACKEND_KEY", BACKEND_KEY);
    });
}

async fn gateway(extra: &str) -> (SimHandle, Replica) {
    set_keys();
    let sim = start_sim(vec![spillway_gateway::sim::ResourceSpec {
        api_key: Some(BACKEND_KEY.into()),
        ..resource(
            "ptu",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        )
    }])
    .await;
    let config = format!(
        "{}auth = {{ type = \"api-key\", env = \"SPILLWAY_HYGIENE_BACKEND_KEY\" }}\n\n[[consumers]]\nname = \"app\"\nkey_env = \"SPILLWAY_HYGIENE_CLIENT_KEY\"\n{extra}",
        backend(&sim, "ptu", 1)
    );
    let gw = start_single(&config).await;
    (sim, gw)
}

/// A request carrying every kind of header a client, a browser or a proxy may add.
async fn send_everything(gw: &Replica) -> reqwest::Response {
    client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            gw.url
        ))
        .header("api-key", CLIENT_KEY)
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("cookie", "session=s3cr3t")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-host", "internal.contoso.local")
        .header("forwarded", "for=203.0.113.7")
        .header("x-team", "search")
        .header("ocp-apim-subscription-key", "apim-key")
        .header("accept-encoding", "gzip")
        .header("accept", "application/json")
        .header("user-agent", "AzureOpenAI/Python 1.55.0")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("tracestate", "congo=t61rcWkgMzE")
        .header("x-ms-client-request-id", "b1c2d3")
        .header("openai-beta", "assistants=v2")
        .json(&chat_body(false))
        .send()
        .await
        .expect("gateway answers")
}

#[tokio::test]
async fn upstream_receives_exactly_the_allow_listed_headers() {
    let (sim, gw) = gateway("").await;
    let response = send_everything(&gw).await;
    assert_eq!(response.status(), 200);
    let received = sim.received("ptu");
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].header_names(),
        [
            "accept",
            "api-key",
            "content-length",
            "content-type",
            "host",
            "openai-beta",
            "traceparent",
            "tracestate",
            "user-agent",
            "x-ms-client-request-id",
        ]
    );
    let value = |name: &str| {
        received[0]
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        value("api-key").as_deref(),
        Some(BACKEND_KEY),
        "the gateway's credential"
    );
    assert_eq!(
        value("user-agent").as_deref(),
        Some("AzureOpenAI/Python 1.55.0")
    );
    assert_eq!(
        value("accept-encoding"),
        None,
        "the gateway reads every body: answers come as they are, whatever the caller accepts"
    );
}

#[tokio::test]
async fn configured_headers_and_forwarding_headers_are_added_never_cookies() {
    let (sim, gw) =
        gateway("\n[headers]\nforward = [\"x-team\"]\nforward_x_forwarded = true\n").await;
    assert_eq!(send_everything(&gw).await.status(), 200);
    let names = sim.received("ptu")[0]
        .header_names()
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    for added in ["x-team", "x-forwarded-for", "x-forwarded-host", "forwarded"] {
        assert!(
            names.iter().any(|n| n == added),
            "{added} missing: {names:?}"
        );
    }
    for never in ["cookie", "authorization", "ocp-apim-subscription-key"] {
        assert!(
            !names.iter().any(|n| n == never),
            "{never} forwarded: {names:?}"
        );
    }
}

#[test]
fn credentials_cannot_be_configured_as_forwarded_headers() {
    let config = "[[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:1\"\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }\n[headers]\nforward = [\"Cookie\", \"api-key\", \"bad header\"]\n";
    let problems = spillway_gateway::config::Config::from_toml(config)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    for key in [
        "headers.forward[0]",
        "headers.forward[1]",
        "headers.forward[2]",
    ] {
        assert!(problems.contains(key), "{problems}");
    }
}

#[tokio::test]
async fn the_client_never_sees_upstream_cookies_or_hosts() {
    let (sim, gw) = gateway("").await;
    let host = sim.url("ptu").trim_start_matches("http://").to_owned();
    sim.set_faults(
        "ptu",
        "gpt-4o",
        Faults {
            response_headers: vec![
                (
                    "set-cookie".into(),
                    "ARRAffinity=abc; Path=/; HttpOnly".into(),
                ),
                ("content-location".into(), format!("http://{host}/openai/x")),
                ("alt-svc".into(), "h3=\":443\"".into()),
                ("x-ms-region".into(), "East US".into()),
            ],
            ..Faults::default()
        },
    );
    let response = send_everything(&gw).await;
    assert_eq!(response.status(), 200);
    for dropped in ["set-cookie", "content-location", "alt-svc"] {
        assert!(
            response.headers().get(dropped).is_none(),
            "{dropped} reached the client"
        );
    }
    assert_eq!(header(&response, "x-ms-region"), "East US");
    assert!(!header(&response, "x-ratelimit-remaining-tokens").is_empty());
}

#[tokio::test]
async fn an_upstream_redirect_is_never_followed() {
    let (sim, gw) = gateway("").await;
    let elsewhere = format!("{}/collect?followed=1", sim.url("ptu"));
    sim.set_faults(
        "ptu",
        "gpt-4o",
        Faults {
            respond_with: Some(spillway_gateway::sim::ForcedResponse {
                status: 307,
                retry_after_ms: None,
                retry_after_s: None,
                code: None,
                times: None,
            }),
            response_headers: vec![("location".into(), elsewhere)],
            ..Faults::default()
        },
    );
    let response = send_everything(&gw).await;
    assert_ne!(response.status(), 200);
    let received = sim.received("ptu");
    assert!(!received.is_empty());
    assert!(
        received
            .iter()
            .all(|r| !r.path_and_query.contains("followed")),
        "the gateway followed the redirect: {:?}",
        received
            .iter()
            .map(|r| &r.path_and_query)
            .collect::<Vec<_>>()
    );
}

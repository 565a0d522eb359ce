//! `spillway healthcheck`, the container image's HEALTHCHECK (no curl in the image): exit 0
//! when `/readyz` answers 200, non-zero with the reason when it answers otherwise or not at
//! all.

use std::process::Command;

fn healthcheck(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["healthcheck", "--url", url, "--timeout", "2s"])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_passes_only_on_a_ready_answer() {
    let app = axum::Router::new()
        .route(
            "/ready",
            axum::routing::get(|| async { "ready (state: embedded)" }),
        )
        .route(
            "/draining",
            axum::routing::get(|| async {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "draining: shutting down",
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let ready = tokio::task::spawn_blocking({
        let url = format!("{base}/ready");
        move || healthcheck(&url)
    })
    .await
    .unwrap();
    assert!(ready.status.success(), "{ready:?}");
    assert!(String::from_utf8_lossy(&ready.stdout).contains("ready"));

    let draining = tokio::task::spawn_blocking({
        let url = format!("{base}/draining");
        move || healthcheck(&url)
    })
    .await
    .unwrap();
    assert!(!draining.status.success());
    assert!(
        String::from_utf8_lossy(&draining.stderr).contains("503"),
        "{draining:?}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", closed.local_addr().unwrap());
    drop(closed);
    let nobody = tokio::task::spawn_blocking(move || healthcheck(&url))
        .await
        .unwrap();
    assert!(!nobody.status.success());
}

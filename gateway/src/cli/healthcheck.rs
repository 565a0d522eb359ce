//! `spillway healthcheck`: probe a running gateway's `/readyz` (a container's HEALTHCHECK
//! needs no curl).

use std::time::Duration;

use super::CliResult;

pub async fn run(url: &str, timeout: Duration) -> CliResult {
    let answer = reqwest::Client::builder()
        .timeout(timeout)
        .build()?
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = answer.status();
    let text = answer.text().await.unwrap_or_default();
    if status.is_success() {
        println!("{}", text.trim());
        Ok(())
    } else {
        Err(format!("{url}: {status} {}", text.trim()).into())
    }
}

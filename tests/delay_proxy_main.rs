//! `spillway-delay-proxy <listen> <target> <one-way-ms>`: relay TCP connections from `listen`
//! to `target`, each byte arriving `one-way-ms` after it was sent, each way. It puts Redis "a
//! region away" from some replicas of the local fleet (`scripts/fleet.sh up --redis-delay-ms`).
//! Loopback addresses only: it is a test tool.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use spillway_tests::delay_proxy::DelayProxy;

fn parse(args: &[String]) -> Result<(SocketAddr, SocketAddr, Duration), String> {
    let [listen, target, ms] = args else {
        return Err(
            "usage: spillway-delay-proxy <listen addr:port> <target addr:port> <one-way ms>".into(),
        );
    };
    let address = |s: &str| -> Result<SocketAddr, String> {
        let addr: SocketAddr = s.parse().map_err(|e| format!("{s}: {e}"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("{s}: loopback addresses only"));
        }
        Ok(addr)
    };
    let ms: u64 = ms.parse().map_err(|e| format!("{ms}: {e}"))?;
    Ok((
        address(listen)?,
        address(target)?,
        Duration::from_millis(ms),
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, target, one_way) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("spillway-delay-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let _proxy = match DelayProxy::start_at(listen, target, one_way).await {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("spillway-delay-proxy: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "spillway-delay-proxy: {listen} -> {target}, {} ms each way",
        one_way.as_millis()
    );
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}

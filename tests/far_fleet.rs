//! A fleet of three replicas on one Redis, each at its own distance from it (a
//! [`DelayProxy`] in between): the set-up of `tests/distance.rs` and of the distance
//! benchmark (`cargo bench -p spillway-tests --bench distance`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use spillway_shared::FallbackState;

use crate::delay_proxy::DelayProxy;
use crate::redis_server::RedisServer;
use crate::{Replica, backend, ptu_and_payg, redis_section, start_on_redis};

/// What one simulated request costs the PTU: 9 prompt and 8 completion tokens.
pub const TOKENS_PER_REQUEST: u64 = 17;
pub const PTU_REQUESTS: u64 = 120;
pub const PTU_TPM: u64 = PTU_REQUESTS * TOKENS_PER_REQUEST;

/// One fleet at a time: five fleets of three replicas sharing two cores would measure the
/// machine, not the distance.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Fleet {
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
    pub replicas: Vec<Replica>,
    pub states: Vec<Arc<FallbackState>>,
    pub sim: spillway_gateway::sim::SimHandle,
    _proxies: Vec<DelayProxy>,
    _redis: RedisServer,
}

/// Three replicas on one Redis, replica `i` `one_way[i]` from it (each way), the PTU with a
/// budget of `ptu_tpm` (none: what the simulated PTU takes).
pub async fn fleet_at(one_way: [Duration; 3], ptu_tpm: Option<u64>) -> Fleet {
    let one_at_a_time = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let sim = ptu_and_payg().await;
    let budget = ptu_tpm.map_or(String::new(), |tpm| format!("tpm = {tpm}\n"));
    let backends = backend(&sim, "ptu", 1)
        .replace("id = \"ptu\"\n", &format!("id = \"ptu\"\n{budget}"))
        + &backend(&sim, "payg", 2);
    let target: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    // One key prefix for the three: they are one fleet.
    let state = redis_section(&redis.url(), "");
    let mut replicas = Vec::new();
    let mut states = Vec::new();
    let mut proxies = Vec::new();
    for delay in one_way {
        let proxy = DelayProxy::start(target, delay).await;
        let config = backends.clone() + &state.replace(&redis.url(), &proxy.redis_url());
        let (replica, fleet) = start_on_redis(&config).await;
        replicas.push(replica);
        states.push(fleet);
        proxies.push(proxy);
    }
    Fleet {
        _one_at_a_time: one_at_a_time,
        replicas,
        states,
        sim,
        _proxies: proxies,
        _redis: redis,
    }
}

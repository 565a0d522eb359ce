//! The fleet-state contract, on the embedded store.

use std::sync::Arc;

use spillway_shared::EmbeddedState;

async fn embedded() -> Arc<EmbeddedState> {
    Arc::new(EmbeddedState::default())
}

spillway_shared::fleet_state_contract!(embedded());

#[tokio::test]
async fn a_failed_probe_reopens_a_breaker_the_failure_rate_opened() {
    let store = EmbeddedState::new(spillway_shared::contract::rate_breaker_windows());
    spillway_shared::contract::a_failed_probe_reopens_a_breaker_the_failure_rate_opened(
        &store, &store,
    )
    .await;
}

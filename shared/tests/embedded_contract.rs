//! The fleet-state contract, on the embedded store.

use std::sync::Arc;

use spillway_shared::{EmbeddedState, FleetState};

async fn embedded() -> Arc<dyn FleetState> {
    Arc::new(EmbeddedState::default())
}

spillway_shared::fleet_state_contract!(embedded());

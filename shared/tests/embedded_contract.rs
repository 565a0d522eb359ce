//! The fleet-state contract, on the embedded store.

use std::sync::Arc;

use spillway_shared::contract::Subject;
use spillway_shared::{EmbeddedState, Windows};

async fn embedded(windows: Windows) -> Subject {
    Subject::new(Arc::new(EmbeddedState::new(windows)))
}

spillway_shared::fleet_state_contract!(embedded);

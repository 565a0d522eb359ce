//! A [`FleetState`](spillway_shared::FleetState) layer that times every call into
//! `spillway_fleet_state_call_seconds` (by operation), so operators see what the shared
//! state costs each request.

use std::sync::Arc;
use std::time::Duration;

use spillway_shared::{Call, FleetLayer, FleetState};

pub struct TimedFleet {
    inner: Arc<dyn FleetState>,
}

impl TimedFleet {
    pub fn new(inner: Arc<dyn FleetState>) -> Self {
        Self { inner }
    }
}

impl FleetLayer for TimedFleet {
    fn inner(&self) -> &dyn FleetState {
        &*self.inner
    }

    fn ended(&self, call: Call, took: Duration) {
        crate::ops::metrics::fleet_state_call(call.name(), took);
    }
}

//! The `FleetState` contract: the request/receipt types every store implements.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// Name of a backend (an Azure OpenAI resource) as configured: `ptu-eastus`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(Arc<str>);

/// Name a client puts in its URL (`gpt-4o`); the pool of deployments that serve it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolName(Arc<str>);

macro_rules! name_type {
    ($t:ident) => {
        impl $t {
            pub fn new(name: impl AsRef<str>) -> Self {
                Self(Arc::from(name.as_ref()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<&str> for $t {
            fn from(name: &str) -> Self {
                Self::new(name)
            }
        }
    };
}
name_type!(BackendId);
name_type!(PoolName);

/// Why a deployment is being avoided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackoffReason {
    /// The upstream answered 429.
    Throttled,
    /// The upstream answered 5xx.
    ServerError,
    /// The upstream rejected the gateway's own credential (401/403).
    AuthRejected,
    /// Connection refused, reset, or TLS failure.
    Unreachable,
    /// No response within the attempt timeout.
    Timeout,
}

impl BackoffReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::ServerError => "server_error",
            Self::AuthRejected => "auth_rejected",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Throttled,
            Self::ServerError,
            Self::AuthRejected,
            Self::Unreachable,
            Self::Timeout,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

impl fmt::Display for BackoffReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// "Avoid this deployment for `duration`, because `reason`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub duration: Duration,
    pub reason: BackoffReason,
}

/// Answer to [`FleetState::acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send the request to this backend.
    Admitted { backend: BackendId },
    /// No candidate admits now; the earliest one will in `retry_after`.
    Exhausted {
        retry_after: Duration,
        /// True when at least one candidate is held back by a 429 (not a failure).
        throttled: bool,
    },
}

/// What a store knows about one pool member right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSnapshot {
    pub backend: BackendId,
    /// Remaining backoff and its reason; `None` when the member is usable.
    pub backoff: Option<Backoff>,
}

/// Everything a router or operator needs about a pool, in one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub pool: PoolName,
    pub members: Vec<MemberSnapshot>,
}

impl PoolSnapshot {
    /// Time until the first member in backoff becomes usable again; zero when one already is.
    pub fn earliest_available(&self) -> Duration {
        self.members
            .iter()
            .map(|m| m.backoff.map_or(Duration::ZERO, |b| b.duration))
            .min()
            .unwrap_or(Duration::ZERO)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("fleet state store unavailable: {0}")]
    Unavailable(String),
}

/// The shared view of the world. Every operation is atomic in its store.
#[async_trait]
pub trait FleetState: Send + Sync + 'static {
    /// Return the first of `candidates` (in preference order) that may take a request now.
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[BackendId],
    ) -> Result<Admission, StateError>;

    /// Hold `backend` back in `pool` for the given time, keeping a later existing deadline.
    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError>;

    /// The state of the given pool members, in the order given.
    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[BackendId],
    ) -> Result<PoolSnapshot, StateError>;

    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StateError>;
}

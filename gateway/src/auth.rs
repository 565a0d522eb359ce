//! Who is calling, and how the gateway calls Azure.

pub mod consumers; // API keys and JWT consumers, their pools and limits
pub mod credentials; // each backend's credential (API key or Entra ID token)
pub mod entra_clients; // consumers that authenticate with Entra ID tokens
pub mod secret; // a secret that never prints

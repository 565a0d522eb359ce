//! The edge: what a connection meets before any route runs, and what every answer passes
//! on its way out.

pub mod headers; // which headers go upstream and come back
pub mod http_server; // the listener: connection cap, idle timeout, graceful stop
pub mod load_shed; // request slots: past them, 503 at once
pub mod tls; // TLS termination

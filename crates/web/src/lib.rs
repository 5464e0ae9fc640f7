//! The master's network face: the listeners and everything served on them.
//!
//! - [`listen`]: the accept loop of both listeners: deadlines, connection caps, the open-file
//!   reserve, TLS handshakes.
//! - [`tls`]: which listener speaks TLS, the certificate it presents (self-signed or the
//!   operator's, reloaded on change), what wrappers are told to trust.
//! - [`endpoint`]: the WebSocket server wrappers talk to.
//! - [`api`]: the operator's HTTP API; [`ui`]: the dashboard, its WebSocket protocol and the
//!   token check shared by both.
//!
//! Everything here talks to the engine through its handle and reads the store only through
//! the engine's queries; nothing here owns run state.

// What no other crate uses is `pub(crate)`, so the compiler reports it once nothing calls it.
#![warn(unreachable_pub)]

pub mod api;
pub mod endpoint;
mod forward;
pub mod listen;
pub mod notifications;
pub mod tls;
pub mod ui;

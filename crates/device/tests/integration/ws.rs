//! The tokio adapter against an in-test WebSocket server.

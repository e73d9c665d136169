//! baton (placeholder while the acceptor is written)

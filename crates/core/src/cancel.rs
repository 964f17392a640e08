//! Cooperative cancellation (Ctrl-C, SIGTERM): long work polls a [`Cancel`] flag, stops, keeps partial work
//! and returns [`Cancelled`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Cooperative cancellation (Ctrl-C, SIGTERM): long stages poll it and stop, keeping partial work.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks every holder to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// The underlying flag, for signal handlers.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

/// Error a stage returns when it stopped because of [`Cancel`].
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

//! What counts as an acknowledgement.
//!
//! Clients ack with no arguments (`successCallback()`). socketioxide 0.18 then resolves the ack
//! future to `Err(AckError::Decode(..))` ("first element not found") whatever type is asked for:
//! the ack did arrive. Only a timeout or a closed socket means "not acked". This is the one
//! place that knows it.

use socketioxide::{ack::AckStream, adapter::Adapter, AckError};

/// Waits for the ack of one emit; `true` if the client acknowledged, with or without arguments.
pub async fn acked<A: Adapter>(ack: AckStream<serde_json::Value, A>) -> bool {
    match ack.await {
        Ok(_) | Err(AckError::Decode(_)) => true,
        Err(AckError::Timeout) | Err(AckError::Socket(_)) => false,
    }
}

//! What counts as an acknowledgement.
//!
//! Clients ack with no arguments (`successCallback()`), some with arguments; either way the ack
//! did arrive. Only a timeout or a closed socket means "not acked". This is the one place that
//! knows it.

use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, SeqAccess, Visitor};
use socketioxide::{ack::AckStream, adapter::Adapter, AckError};

/// Emit with `emit_with_ack::<_, AckArgs>`, and wait with [`acked`].
///
/// An ack's arguments, whatever they are, read and dropped. Asked for a tuple type, socketioxide
/// hands over the whole argument array; asked for anything else (`serde_json::Value`), it
/// decodes the first argument, and for the usual ack without arguments it builds a decode error
/// ("first element not found") and its message, for every ack (BENCHMARKS.md, item 18).
pub struct AckArgs;

impl<'de> Deserialize<'de> for AckArgs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Skip;

        impl<'de> Visitor<'de> for Skip {
            type Value = AckArgs;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the arguments of an ack")
            }

            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<AckArgs, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(AckArgs)
            }
        }

        // Any number of arguments: the length is not checked.
        deserializer.deserialize_tuple(usize::MAX, Skip)
    }
}

/// Waits for the ack of one emit; `true` if the client acknowledged, with or without arguments.
pub async fn acked<A: Adapter>(ack: AckStream<AckArgs, A>) -> bool {
    match ack.await {
        // A decode error (arguments the parser cannot read) still means the ack arrived.
        Ok(_) | Err(AckError::Decode(_)) => true,
        Err(AckError::Timeout) | Err(AckError::Socket(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_arguments_are_an_ack() {
        for args in ["[]", "[null]", r#"[1,"two",{"three":[3]}]"#] {
            assert!(serde_json::from_str::<AckArgs>(args).is_ok(), "{args}");
        }
        assert!(serde_json::from_str::<AckArgs>("{}").is_err());
    }
}

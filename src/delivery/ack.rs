//! Acknowledgements: what counts as one, and recording them in the order clients sent them.
//!
//! Clients ack with no arguments (`successCallback()`), some with arguments; either way the ack
//! did arrive. Only a timeout or a closed socket means "not acked".
//!
//! Order matters: with `resync=true` an ack is checked against the messages still queued, so
//! two acks of one device recorded in the wrong order look like an out-of-order ack (and clear
//! the queue). A socket's acks are read one after the other by its connection's task, and each
//! wakes the waker of its [`AckStream`] right there, as it is read. So every watched ack has a
//! waker of its own ([`Watched`]) that appends it to one queue: the queue holds the acks in the
//! order they were read, and one task ([`Acks::record`]) takes them from it and hands them to
//! the store in that order, as many as have arrived in one store job. A fan-out's acks, which
//! arrive together, share a job.
//!
//! An ack is watched (its waker given to the stream) right after its emit, before the client
//! can have answered: an answer needs a network round trip, the registration a few
//! instructions. An answer that came first anyway is queued at registration.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use serde::de::{Deserialize, Deserializer, IgnoredAny, SeqAccess, Visitor};
use socketioxide::{ack::AckStream, AckError};
use tokio::sync::Notify;

use crate::store::Ack;

/// Emit with `emit_with_ack::<_, AckArgs>`, and watch the ack with `Acks::watch`.
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

/// `true` if the client acknowledged, with or without arguments.
fn is_ack(result: &Result<AckArgs, AckError>) -> bool {
    // A decode error (arguments the parser cannot read) still means the ack arrived.
    matches!(result, Ok(_) | Err(AckError::Decode(_)))
}

type Stream = Pin<Box<AckStream<AckArgs>>>;

/// The acks watched, and those that have arrived, in the order they arrived.
#[derive(Default)]
pub(super) struct Acks {
    arrived: Mutex<VecDeque<Arc<Watched>>>,
    /// Wakes [`Acks::record`]'s task; a notification with no waiter is kept for it.
    notify: Notify,
}

/// One watched ack. Its waker is itself: waking it queues it.
struct Watched {
    state: Mutex<State>,
    acks: Arc<Acks>,
}

enum State {
    /// Not answered yet.
    Waiting(Stream, Ack),
    /// Answered: to be recorded.
    Answered(Ack),
    /// Recorded, timed out, or its socket closed.
    Done,
}

impl Wake for Watched {
    fn wake(self: Arc<Self>) {
        let acks = self.acks.clone();
        acks.arrived(self);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.acks.arrived(self.clone());
    }
}

impl Watched {
    /// Polls the stream once with this waker. `true` once it has an answer or is done.
    fn poll(self: &Arc<Self>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State::Waiting(stream, _) = &mut *state else { return true };
        let waker = Waker::from(self.clone());
        // Unconstrained: tokio's cooperative budget could answer `Pending` and wake again,
        // which would queue this ack behind later ones.
        let mut unconstrained = tokio::task::unconstrained(stream.as_mut());
        let Poll::Ready(result) = Pin::new(&mut unconstrained).poll(&mut Context::from_waker(&waker)) else {
            return false;
        };
        let State::Waiting(_, ack) = std::mem::replace(&mut *state, State::Done) else { unreachable!() };
        if is_ack(&result) {
            *state = State::Answered(ack);
        } else {
            tracing::debug!(?ack, "no ack: the message stays queued for the next _batch");
        }
        true
    }

    /// The ack to record, if it was answered and not taken yet.
    fn take(self: &Arc<Self>) -> Option<Ack> {
        if !self.poll() {
            return None; // a wake that was not an answer (a timer's)
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *state, State::Done) {
            State::Answered(ack) => Some(ack),
            _ => None,
        }
    }
}

impl Acks {
    /// Watches the ack of an emit; `ack` is what it records once the client answers.
    pub(super) fn watch(self: &Arc<Self>, stream: AckStream<AckArgs>, ack: Ack) {
        let watched =
            Arc::new(Watched { state: Mutex::new(State::Waiting(Box::pin(stream), ack)), acks: self.clone() });
        if watched.poll() {
            self.arrived(watched); // answered (or closed) already
        }
    }

    fn arrived(&self, watched: Arc<Watched>) {
        self.arrived.lock().unwrap_or_else(|p| p.into_inner()).push_back(watched);
        self.notify.notify_one();
    }

    /// Waits for acks, then returns those that arrived, in order (at least one).
    pub(super) async fn next(&self) -> Vec<Ack> {
        loop {
            let arrived = std::mem::take(&mut *self.arrived.lock().unwrap_or_else(|p| p.into_inner()));
            let acks: Vec<Ack> = arrived.iter().filter_map(Watched::take).collect();
            if !acks.is_empty() {
                return acks;
            }
            self.notify.notified().await;
        }
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

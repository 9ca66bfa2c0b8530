//! The small traits a platform implements — a transport and a clock, beside
//! [`super::Storage`] — modelled on `embedded-svc`'s blocking ones, and a blocking driver that
//! runs a session over them: what a firmware's main loop does, and what the tests run on a
//! manual clock and a fake transport.

use std::fmt;

use rand_core::RngCore;

use super::commands::Handlers;
use super::session::{Action, ConnectFailure, LinkState, Session, StopReason};
use super::storage::Storage;
use super::wire::{Encoding, Message};

/// Time as the device sees it.
pub trait Clock {
    /// Monotonic milliseconds since boot (an ESP32's `esp_timer_get_time() / 1000`).
    fn now_ms(&self) -> u64;

    /// Unix milliseconds, once the clock is set (SNTP, a GPS fix); `None` until then.
    fn wall_ms(&self) -> Option<i64> {
        None
    }
}

/// What [`Transport::recv`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A data message.
    Message(Message),
    /// The connection closed, with the peer's code if it sent one.
    Closed(Option<u16>),
    /// Nothing arrived in time.
    Timeout,
}

/// A WebSocket client, blocking. It knows its URL, key and subprotocol already.
pub trait Transport {
    /// What can go wrong while connected.
    type Error: fmt::Debug + fmt::Display;

    /// Opens the connection (the upgrade offering the subprotocol and `key.<key>`).
    fn connect(&mut self) -> Result<(), ConnectFailure>;

    /// Sends one message.
    fn send(&mut self, message: Message) -> Result<(), Self::Error>;

    /// Waits up to `timeout_ms` for a message. Not connected, it waits the whole time and
    /// answers [`Received::Timeout`] (a channel's `recv_timeout` does both).
    fn recv(&mut self, timeout_ms: u64) -> Result<Received, Self::Error>;

    /// Closes the connection with `code` (best-effort, never fails).
    fn close(&mut self, code: u16);
}

/// Runs a session over a blocking transport.
#[derive(Debug)]
pub struct Blocking<T, C> {
    /// The transport.
    pub transport: T,
    /// The clock.
    pub clock: C,
    /// How frames are encoded (the subprotocol the transport offers).
    pub encoding: Encoding,
}

impl<T: Transport, C: Clock> Blocking<T, C> {
    /// A driver over `transport` and `clock`.
    pub fn new(transport: T, clock: C, encoding: Encoding) -> Self {
        Self {
            transport,
            clock,
            encoding,
        }
    }

    /// Drives `session` until `deadline` (monotonic ms) or until it stops; `Some` with the
    /// reason if it stopped. Transport failures are closes, handled by the session; only the
    /// storage's errors come back.
    pub fn run_until<S: Storage, R: RngCore>(
        &mut self,
        session: &mut Session<S, R>,
        handlers: &mut Handlers,
        deadline: u64,
    ) -> Result<Option<StopReason>, S::Error> {
        loop {
            let now = self.now(session);
            session.handle_timeout(now)?;
            while let Some(action) = session.poll_action() {
                match action {
                    Action::Connect => match self.transport.connect() {
                        Ok(()) => session.handle_connected(self.clock.now_ms()),
                        Err(failure) => session.handle_connect_failed(self.clock.now_ms(), failure),
                    },
                    Action::Close { code } => self.transport.close(code),
                    Action::Command(command) => {
                        let reply = handlers.run(&command);
                        session.command_done(&command.id, reply);
                    }
                    Action::Config(update) => {
                        let (version, state) = handlers.apply(&update);
                        session.config_applied(version, state);
                    }
                    Action::Stopped(reason) => return Ok(Some(reason)),
                }
            }
            if let LinkState::Stopped(reason) = session.state() {
                return Ok(Some(reason));
            }
            while let Some(frame) = session.poll_transmit(now)? {
                if self.transport.send(self.encoding.encode(&frame)).is_err() {
                    self.transport.close(unhidra_protocol::close::GOING_AWAY);
                    session.handle_closed(self.clock.now_ms(), None);
                    break;
                }
            }
            let now = self.clock.now_ms();
            if now >= deadline {
                return Ok(None);
            }
            let wake = session.poll_timeout().unwrap_or(deadline).min(deadline);
            match self.transport.recv(wake.saturating_sub(now)) {
                Ok(Received::Message(message)) => {
                    session.handle_message(self.clock.now_ms(), &message)?;
                }
                Ok(Received::Closed(code)) => session.handle_closed(self.clock.now_ms(), code),
                Ok(Received::Timeout) => {}
                Err(_) => {
                    self.transport.close(unhidra_protocol::close::GOING_AWAY);
                    session.handle_closed(self.clock.now_ms(), None);
                }
            }
        }
    }

    fn now<S: Storage, R: RngCore>(&self, session: &mut Session<S, R>) -> u64 {
        let now = self.clock.now_ms();
        if let Some(wall) = self.clock.wall_ms() {
            session.set_wall_clock(now, wall);
        }
        now
    }
}

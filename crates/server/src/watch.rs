//! Live topics on a person's WebSocket: a `watch` frame subscribes the connection to a topic,
//! `unwatch` ends it, and `update` frames carry what happens meanwhile.
//!
//! | topic | who | what |
//! |---|---|---|
//! | `fleet` | everyone (their own devices; admins: all) | devices' status, alerts, commands, device events; revocations (admins) |
//! | `deployments` | admins | every deployment's state and stage |
//! | `deployment:<id>` | admins | that deployment's state and each of its devices' |
//!
//! Updates are best-effort and never replayed: a watcher that falls behind gets
//! `{"event": "lagged", "missed": n}` and reads the REST API for the record. One forwarding task
//! per connection, started at its first `watch` and stopped when the connection ends.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use unhidra_chat::hub::{ConnId, Hub};
use unhidra_devices::{Devices, FleetEvent};
use unhidra_ota::{DeployError, DeploymentEvent};
use unhidra_protocol::ServerFrame;
use uuid::Uuid;

use crate::identity::Principal;
use crate::state::AppState;

/// Topics one connection may watch at once.
pub(crate) const MAX_WATCHES: usize = 8;

/// What an `invalid_topic` error says.
const NO_SUCH_TOPIC: &str = "topics are `fleet`, `deployments` and `deployment:<id>`";

/// What a `forbidden` error says.
const ADMINS_ONLY: &str = "deployments are followed by admins";

/// A topic, parsed once: its name is the server's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Topic {
    Fleet,
    Deployments,
    Deployment(Uuid),
}

impl Topic {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "fleet" => Some(Self::Fleet),
            "deployments" => Some(Self::Deployments),
            _ => {
                let id = name.strip_prefix("deployment:")?;
                // The canonical spelling only, so that one deployment is one topic.
                let parsed = Uuid::try_parse(id).ok()?;
                (parsed.hyphenated().to_string() == id).then_some(Self::Deployment(parsed))
            }
        }
    }

    fn name(self) -> String {
        match self {
            Self::Fleet => "fleet".into(),
            Self::Deployments => "deployments".into(),
            Self::Deployment(id) => format!("deployment:{id}"),
        }
    }
}

/// What the forwarding task reads: the topics watched now, and who watches them.
#[derive(Debug)]
struct Watching {
    who: Principal,
    topics: BTreeSet<Topic>,
}

impl Watching {
    /// Whether `topic` may be added: the connection watches fewer than [`MAX_WATCHES`]
    /// topics, or this one already.
    fn has_room_for(&self, topic: Topic) -> bool {
        self.topics.len() < MAX_WATCHES || self.topics.contains(&topic)
    }
}

/// A connection's watches.
pub(crate) struct Watches {
    id: ConnId,
    shared: Arc<Mutex<Watching>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Watches {
    pub(crate) fn new(id: ConnId, who: Principal) -> Self {
        Self {
            id,
            shared: Arc::new(Mutex::new(Watching {
                who,
                topics: BTreeSet::new(),
            })),
            task: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watching> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A `watch` frame: answered with `watching`, or an error frame whose `ref` is the topic
    /// (`invalid_topic`, `forbidden`, `not_found`, `too_many_watches`).
    pub(crate) async fn watch(&mut self, state: &AppState, who: &Principal, name: String) {
        let hub = state.chat().hub();
        let refuse = |code: &str, message: &str| {
            tracing::info!(connection = self.id, code, "watch refused");
            hub.send_to(self.id, &error(code, message, &name));
        };
        let Some(topic) = Topic::parse(&name) else {
            return refuse("invalid_topic", NO_SUCH_TOPIC);
        };
        // Before any lookup: a connection at its limit costs no store read.
        if !self.lock().has_room_for(topic) {
            return refuse("too_many_watches", "at most 8 topics at once");
        }
        match topic {
            Topic::Fleet => {}
            Topic::Deployments if state.deployments().may_watch(who) => {}
            Topic::Deployments => {
                return refuse("forbidden", ADMINS_ONLY);
            }
            Topic::Deployment(id) => match state.deployments().get(who, id).await {
                Ok(_) => {}
                Err(DeployError::Forbidden) => {
                    return refuse("forbidden", ADMINS_ONLY);
                }
                Err(DeployError::NotFound) => return refuse("not_found", "no such deployment"),
                Err(e) => {
                    tracing::warn!(connection = self.id, error = %e, "watch failed");
                    return refuse("internal", "the deployment could not be read");
                }
            },
        }
        {
            // Only this connection's task changes the topics: the room checked above is there.
            let mut watching = self.lock();
            watching.topics.insert(topic);
            // The latest credentials decide what is shown (an `auth` frame may renew them).
            watching.who = who.clone();
        }
        if self.task.is_none() {
            self.task = Some(tokio::spawn(forward(
                state.clone(),
                self.id,
                Arc::clone(&self.shared),
                state.devices().events(),
                state.deployments().events(),
            )));
        }
        hub.send_to(
            self.id,
            &ServerFrame::Watching {
                topic: topic.name(),
                active: true,
            },
        );
    }

    /// The connection authenticated again (an `auth` frame): updates are shown as the new
    /// credentials allow (a role that changed since, on any node, counts from here), and
    /// topics they no longer allow end, each told with `watching` `active: false`.
    pub(crate) fn reauthenticated(&mut self, state: &AppState, who: &Principal) {
        let ended: Vec<Topic> = {
            let mut watching = self.lock();
            watching.who = who.clone();
            if state.deployments().may_watch(who) {
                Vec::new()
            } else {
                let ended: Vec<Topic> = watching
                    .topics
                    .iter()
                    .copied()
                    .filter(|t| *t != Topic::Fleet)
                    .collect();
                watching.topics.retain(|t| *t == Topic::Fleet);
                ended
            }
        };
        for topic in ended {
            state.chat().hub().send_to(
                self.id,
                &ServerFrame::Watching {
                    topic: topic.name(),
                    active: false,
                },
            );
        }
    }

    /// An `unwatch` frame: answered with `watching` and `active: false` (also for a topic that
    /// was not watched), or `invalid_topic`.
    pub(crate) fn unwatch(&mut self, hub: &Hub, name: &str) {
        let Some(topic) = Topic::parse(name) else {
            hub.send_to(self.id, &error("invalid_topic", NO_SUCH_TOPIC, name));
            return;
        };
        self.lock().topics.remove(&topic);
        hub.send_to(
            self.id,
            &ServerFrame::Watching {
                topic: topic.name(),
                active: false,
            },
        );
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn error(code: &str, message: &str, topic: &str) -> ServerFrame {
    let mut frame = ServerFrame::error(code, message);
    if let ServerFrame::Error { reference, .. } = &mut frame {
        // A topic that is not one is not echoed at any length.
        *reference = Some(topic.chars().take(100).collect());
    }
    frame
}

/// Whether a fleet event is for this watcher.
fn fleet_visible(devices: &Devices, who: &Principal, event: &FleetEvent) -> bool {
    match event {
        FleetEvent::Status { owner, .. }
        | FleetEvent::Alert { owner, .. }
        | FleetEvent::Command { owner, .. }
        | FleetEvent::Device { owner, .. } => devices.may_watch(who, *owner),
        // A revocation names no owner: the fleet's admins hear of it.
        FleetEvent::Revoked { .. } => devices.may_watch(who, None),
    }
}

/// The topics of `watching` a deployment event goes to.
fn deployment_topics(watching: &Watching, event: &DeploymentEvent) -> Vec<Topic> {
    let mut out = Vec::new();
    if matches!(event, DeploymentEvent::Deployment { .. })
        && watching.topics.contains(&Topic::Deployments)
    {
        out.push(Topic::Deployments);
    }
    let own = Topic::Deployment(event.deployment());
    if watching.topics.contains(&own) {
        out.push(own);
    }
    out
}

fn update(topic: Topic, data: serde_json::Value) -> ServerFrame {
    ServerFrame::Update {
        topic: topic.name(),
        data,
    }
}

fn lagged(missed: u64) -> serde_json::Value {
    serde_json::json!({ "event": "lagged", "missed": missed })
}

/// Sends a connection the updates of the topics it watches, until it ends.
async fn forward(
    state: AppState,
    id: ConnId,
    shared: Arc<Mutex<Watching>>,
    mut fleet: Receiver<FleetEvent>,
    mut deployments: Receiver<DeploymentEvent>,
) {
    let (hub, devices) = (state.chat().hub(), state.devices());
    let lock = || {
        shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    loop {
        tokio::select! {
            event = fleet.recv() => {
                let frame = match event {
                    Ok(event) => {
                        let watching = lock();
                        if !watching.topics.contains(&Topic::Fleet)
                            || !fleet_visible(devices, &watching.who, &event)
                        {
                            continue;
                        }
                        drop(watching);
                        match serde_json::to_value(&event) {
                            Ok(data) => update(Topic::Fleet, data),
                            Err(_) => continue,
                        }
                    }
                    Err(RecvError::Lagged(missed)) if lock().topics.contains(&Topic::Fleet) => {
                        update(Topic::Fleet, lagged(missed))
                    }
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                };
                hub.send_to(id, &frame);
            }
            event = deployments.recv() => {
                match event {
                    Ok(event) => {
                        let topics = {
                            let watching = lock();
                            // Checked at each update too: what `watch` allowed must still hold.
                            if !state.deployments().may_watch(&watching.who) {
                                continue;
                            }
                            deployment_topics(&watching, &event)
                        };
                        if topics.is_empty() {
                            continue;
                        }
                        let Ok(data) = serde_json::to_value(&event) else { continue };
                        for topic in topics {
                            hub.send_to(id, &update(topic, data.clone()));
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        let topics: Vec<Topic> = lock()
                            .topics
                            .iter()
                            .copied()
                            .filter(|t| *t != Topic::Fleet)
                            .collect();
                        for topic in topics {
                            hub.send_to(id, &update(topic, lagged(missed)));
                        }
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_have_one_spelling() {
        let id = Uuid::parse_str("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b").unwrap();
        assert_eq!(Topic::parse("fleet"), Some(Topic::Fleet));
        assert_eq!(Topic::parse("deployments"), Some(Topic::Deployments));
        assert_eq!(
            Topic::parse(&format!("deployment:{id}")),
            Some(Topic::Deployment(id))
        );
        for other in [
            String::new(),
            "Fleet".into(),
            "fleet ".into(),
            "deployment:".into(),
            format!("deployment:{}", id.simple()),
            format!("deployment:{}", id.to_string().to_uppercase()),
            format!("deployment:{{{id}}}"),
            format!("deployment:urn:uuid:{id}"),
        ] {
            assert_eq!(Topic::parse(&other), None, "{other}");
        }
        assert_eq!(Topic::Deployment(id).name(), format!("deployment:{id}"));
    }

    #[test]
    fn a_connection_watches_at_most_eight_topics() {
        let who = Principal {
            user_id: unhidra_core::UserId(Uuid::nil()),
            role: unhidra_core::Role::User,
            session_id: Uuid::nil(),
            mfa: false,
        };
        let mut watching = Watching {
            who,
            topics: BTreeSet::new(),
        };
        watching.topics.insert(Topic::Fleet);
        for i in 1..MAX_WATCHES {
            let topic = Topic::Deployment(Uuid::from_u128(i as u128));
            assert!(watching.has_room_for(topic));
            watching.topics.insert(topic);
        }
        assert_eq!(watching.topics.len(), MAX_WATCHES);
        assert!(!watching.has_room_for(Topic::Deployments));
        // One already watched may be watched again.
        assert!(watching.has_room_for(Topic::Fleet));
        watching.topics.remove(&Topic::Fleet);
        assert!(watching.has_room_for(Topic::Deployments));
    }
}

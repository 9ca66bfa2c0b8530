//! Commands and configuration as the application sees them: the handlers registered by name,
//! the memory of handled command ids that makes a re-delivered command run once, and how a
//! `config` difference merges into what a device has.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde_json::{Value as Json, json};
use unhidra_protocol::device::CommandStatus;

/// A command from the server, for the application to carry out.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Its id: the session answers with it and dedupes on it.
    pub id: String,
    /// What to do.
    pub name: String,
    /// Its arguments.
    pub params: Json,
    /// Not to be started after this, Unix ms.
    pub expires_at: i64,
}

/// How a command ended: the `status` and `output` of its `command_result`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandReply {
    /// Whether it worked.
    pub status: CommandStatus,
    /// What it returned, or why it failed.
    pub output: Option<Json>,
}

impl CommandReply {
    /// It worked, with this output (`null` for none).
    pub fn succeeded(output: Json) -> Self {
        Self {
            status: CommandStatus::Succeeded,
            output: (!output.is_null()).then_some(output),
        }
    }

    /// It failed: `{"error": code}`, the shape `docs/protocol.md` uses.
    pub fn failed(code: &str) -> Self {
        Self {
            status: CommandStatus::Failed,
            output: Some(json!({ "error": code })),
        }
    }
}

/// A configuration from the server, for the application to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigUpdate {
    /// Its version: what `reported` names once it is applied.
    pub version: u64,
    /// Key → value: everything (`full`), or only what differs, `null` meaning "back to the
    /// default".
    pub desired: BTreeMap<String, Json>,
    /// Whether `desired` is the whole configuration.
    pub full: bool,
}

impl ConfigUpdate {
    /// Applies every key to `state`, as the protocol defines it: a full configuration
    /// replaces `state`, a difference merges into it, and `null` removes a key.
    pub fn merge_into(&self, state: &mut BTreeMap<String, Json>) {
        if self.full {
            state.clear();
        }
        for (key, value) in &self.desired {
            if value.is_null() {
                state.remove(key);
            } else {
                state.insert(key.clone(), value.clone());
            }
        }
    }
}

type CommandFn = Box<dyn FnMut(&Json) -> CommandReply + Send>;
type ConfigFn = Box<dyn FnMut(&ConfigUpdate, &mut BTreeMap<String, Json>) + Send>;

/// The application's side: a handler per command name, and what applying a configuration
/// does. Drivers call [`Handlers::run`] and [`Handlers::apply`] for the session's actions.
pub struct Handlers {
    commands: BTreeMap<String, CommandFn>,
    config: ConfigFn,
    state: BTreeMap<String, Json>,
    version: Option<u64>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handlers")
            .field("commands", &self.commands.keys().collect::<Vec<_>>())
            .field("state", &self.state)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Default for Handlers {
    /// No commands (each answered `unknown_command`); every configuration key accepted.
    fn default() -> Self {
        Self {
            commands: BTreeMap::new(),
            config: Box::new(|update, state| update.merge_into(state)),
            state: BTreeMap::new(),
            version: None,
        }
    }
}

impl Handlers {
    /// No commands, every configuration key accepted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles the command `name` with `handler`, which gets its params.
    pub fn on(
        mut self,
        name: &str,
        handler: impl FnMut(&Json) -> CommandReply + Send + 'static,
    ) -> Self {
        self.commands.insert(name.to_owned(), Box::new(handler));
        self
    }

    /// Applies configurations with `apply`, which changes the state it is given (leaving out
    /// a key it refuses) instead of merging every key.
    pub fn on_config(
        mut self,
        apply: impl FnMut(&ConfigUpdate, &mut BTreeMap<String, Json>) + Send + 'static,
    ) -> Self {
        self.config = Box::new(apply);
        self
    }

    /// Starts from this configuration (read from the application's own storage at boot).
    pub fn with_config(mut self, version: Option<u64>, state: BTreeMap<String, Json>) -> Self {
        self.version = version;
        self.state = state;
        self
    }

    /// Runs a command's handler; `failed {"error": "unknown_command"}` when there is none.
    pub fn run(&mut self, command: &Command) -> CommandReply {
        match self.commands.get_mut(&command.name) {
            Some(handler) => handler(&command.params),
            None => CommandReply::failed("unknown_command"),
        }
    }

    /// Applies a configuration; answers the version and whole state to report.
    pub fn apply(&mut self, update: &ConfigUpdate) -> (Option<u64>, BTreeMap<String, Json>) {
        (self.config)(update, &mut self.state);
        self.version = Some(update.version);
        self.reported()
    }

    /// The configuration as it is now: what `reported` says.
    pub fn reported(&self) -> (Option<u64>, BTreeMap<String, Json>) {
        (self.version, self.state.clone())
    }
}

/// The ids of recent commands and, once done, their replies, so that a command delivered
/// again is answered again rather than run again. Bounded: the oldest id is forgotten first.
#[derive(Debug, Clone)]
pub(crate) struct CommandMemory {
    capacity: usize,
    entries: VecDeque<(String, Option<CommandReply>)>,
}

/// What to do with an arriving command.
#[derive(Debug, PartialEq)]
pub(crate) enum Seen {
    /// Never seen: run it.
    New,
    /// Running: its result will come.
    Running,
    /// Done: answer this again.
    Done(CommandReply),
}

impl CommandMemory {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: VecDeque::new(),
        }
    }

    /// Looks an id up and, if it is new, remembers it as running (or as done with `reply`).
    pub(crate) fn admit(&mut self, id: &str, reply: Option<CommandReply>) -> Seen {
        if let Some((_, known)) = self.entries.iter().find(|(known, _)| known == id) {
            return match known {
                Some(reply) => Seen::Done(reply.clone()),
                None => Seen::Running,
            };
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((id.to_owned(), reply));
        Seen::New
    }

    /// Notes a command's reply.
    pub(crate) fn done(&mut self, id: &str, reply: CommandReply) {
        match self.entries.iter_mut().find(|(known, _)| known == id) {
            Some((_, slot)) => *slot = Some(reply),
            None => {
                self.admit(id, Some(reply));
            }
        }
    }
}

//! The bench's side of its job nodes: child processes that speak one line protocol, whether
//! they are Unhidra's (`unhidra-bench jobs-node`, [`crate::jobs_node`]) or graphile-worker's
//! (`bench/peers/graphile-worker/node.js`). What any of them says arrives on one channel,
//! tagged with the node's index.
//!
//! To a node: `prefill N BATCH` (graphile-worker only), `go`, `quiet`, `latency SAMPLES GAP_MS`,
//! `stop`. From a node: `ready`, `prefilled N SECONDS`, `running T_US`, `progress N T_US`,
//! `started SEQ LATENCY_US`, `latency-done`, `stopped`, `error MESSAGE`. Times are
//! microseconds since the Unix epoch.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::BoxError;

/// How long a node gets to stop once asked to.
const STOP_WITHIN: Duration = Duration::from_secs(15);

/// What a node said.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Connected, ready for `go`.
    Ready,
    /// Its pre-fill is done: `count` jobs in `seconds`.
    Prefilled {
        /// Jobs stored.
        count: u64,
        /// How long it took.
        seconds: f64,
    },
    /// Its workers run since `at_us`.
    Running {
        /// When they started.
        at_us: u64,
    },
    /// Its count of no-op jobs so far (Unhidra: completions recorded; graphile-worker: tasks
    /// run), at `at_us`.
    Progress {
        /// The count.
        count: u64,
        /// When it was read.
        at_us: u64,
    },
    /// A latency job started, `latency_us` after the call that enqueued it began.
    Started {
        /// The job's number.
        seq: u64,
        /// Enqueue to start.
        latency_us: u64,
    },
    /// The latency jobs it enqueued itself have all started.
    LatencyDone,
    /// Its workers stopped and its pool closed.
    Stopped,
    /// It failed.
    Error(String),
    /// Its stdout closed: it exited.
    Exited,
}

impl Event {
    /// Reads one line of a node's stdout.
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("a node said {line:?}"))
        };
        Ok(match words.first().copied() {
            Some("ready") => Self::Ready,
            Some("prefilled") => Self::Prefilled {
                count: number(1)?,
                seconds: words
                    .get(2)
                    .and_then(|w| w.parse().ok())
                    .ok_or_else(|| format!("a node said {line:?}"))?,
            },
            Some("running") => Self::Running { at_us: number(1)? },
            Some("progress") => Self::Progress {
                count: number(1)?,
                at_us: number(2)?,
            },
            Some("started") => Self::Started {
                seq: number(1)?,
                latency_us: number(2)?,
            },
            Some("latency-done") => Self::LatencyDone,
            Some("stopped") => Self::Stopped,
            Some("error") => Self::Error(line.trim_start_matches("error").trim().to_owned()),
            _ => return Err(format!("a node said {line:?}")),
        })
    }
}

#[derive(Debug)]
struct Node {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    label: String,
}

/// The running nodes of one measurement; killed if dropped.
#[derive(Debug)]
pub struct Nodes {
    nodes: Vec<Node>,
    tx: mpsc::UnboundedSender<(usize, Event)>,
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
}

impl Nodes {
    /// No nodes yet.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            nodes: Vec::new(),
            tx,
            rx,
        }
    }

    /// Starts `command` as the next node (its stderr goes to the bench's), and waits until it
    /// says `ready`.
    pub async fn start(
        &mut self,
        mut command: Command,
        label: String,
        within: Duration,
    ) -> Result<usize, BoxError> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {label}: {e}"))?;
        let (Some(pid), Some(stdin), Some(stdout)) =
            (child.id(), child.stdin.take(), child.stdout.take())
        else {
            return Err(format!("{label} exited as soon as it was started").into());
        };
        let index = self.nodes.len();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = Event::parse(&line).unwrap_or_else(Event::Error);
                if tx.send((index, event)).is_err() {
                    return;
                }
            }
            let _ = tx.send((index, Event::Exited));
        });
        self.nodes.push(Node {
            child,
            pid,
            stdin,
            label,
        });
        let deadline = Instant::now() + within;
        loop {
            match self.next(deadline).await? {
                (i, Event::Ready) if i == index => return Ok(index),
                _ => {}
            }
        }
    }

    /// How many nodes run.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Their process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.pid).collect()
    }

    /// Sends a command to node `index`.
    pub async fn send(&mut self, index: usize, command: &str) -> Result<(), BoxError> {
        let node = self
            .nodes
            .get_mut(index)
            .ok_or_else(|| format!("no node {index}"))?;
        let line = format!("{command}\n");
        node.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("{} does not listen: {e}", node.label))?;
        node.stdin.flush().await?;
        Ok(())
    }

    /// Sends a command to every node.
    pub async fn send_all(&mut self, command: &str) -> Result<(), BoxError> {
        for index in 0..self.nodes.len() {
            self.send(index, command).await?;
        }
        Ok(())
    }

    /// The next thing a node said, before `deadline`; a node's error or exit is an error.
    pub async fn next(&mut self, deadline: Instant) -> Result<(usize, Event), BoxError> {
        let got = tokio::time::timeout_at(deadline, self.rx.recv())
            .await
            .map_err(|_| "a node did not answer in time")?;
        match got {
            Some((i, Event::Error(why))) => Err(format!("{} failed: {why}", self.label(i)).into()),
            Some((i, Event::Exited)) => {
                Err(format!("{} exited unexpectedly", self.label(i)).into())
            }
            Some(event) => Ok(event),
            None => Err("every node is gone".into()),
        }
    }

    fn label(&self, index: usize) -> &str {
        self.nodes.get(index).map_or("a node", |n| n.label.as_str())
    }

    /// Asks every node to stop and waits until each has said so and exited; one that does
    /// not within 15 s is killed.
    pub async fn stop(mut self) {
        let _ = self.send_all("stop").await;
        let deadline = Instant::now() + STOP_WITHIN;
        let mut stopped = vec![false; self.nodes.len()];
        while !stopped.iter().all(|s| *s) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((i, Event::Stopped | Event::Exited | Event::Error(_)))) => {
                    if let Some(s) = stopped.get_mut(i) {
                        *s = true;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        for node in &mut self.nodes {
            if tokio::time::timeout_at(deadline, node.child.wait())
                .await
                .is_err()
            {
                crate::note(&format!("{} did not stop; killing it", node.label));
                let _ = node.child.start_kill();
                let _ = node.child.wait().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read() {
        assert_eq!(Event::parse("ready"), Ok(Event::Ready));
        assert_eq!(
            Event::parse("progress 120 1700000000000000"),
            Ok(Event::Progress {
                count: 120,
                at_us: 1_700_000_000_000_000
            })
        );
        assert_eq!(
            Event::parse("started 7 850"),
            Ok(Event::Started {
                seq: 7,
                latency_us: 850
            })
        );
        assert_eq!(
            Event::parse("prefilled 1000 0.25"),
            Ok(Event::Prefilled {
                count: 1000,
                seconds: 0.25
            })
        );
        assert_eq!(
            Event::parse("error no database"),
            Ok(Event::Error("no database".to_owned()))
        );
        assert!(Event::parse("progress x").is_err());
        assert!(Event::parse("hello").is_err());
    }
}

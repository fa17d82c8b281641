//! The three windows of a run (before the erasure, during it, after it) and what the
//! ingestion load met in each: every TrackEvent call counts in the window its scheduled
//! instant falls in, so a call scheduled just before DeleteUser but slowed by it counts
//! before. Also the sessions of the bench database PostgreSQL showed active, by wait
//! event, sampled in each window (where the time went when the erasure slows ingestion).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use analytics_bench::loops::{new_histogram, PacedOutcome};
use hdrhistogram::Histogram;
use tokio::time::Instant;

/// The windows, in order.
pub(crate) const WINDOWS: [&str; 3] = ["before", "during erasure", "after"];

/// What the load met in one window.
pub(crate) struct Window {
    pub(crate) events: u64,
    pub(crate) errors: u64,
    /// Microseconds from each call's scheduled instant to its answer.
    pub(crate) latency: Histogram<u64>,
    /// Samples of active sessions by "wait_event_type:wait_event" ("running" when none).
    pub(crate) waits: BTreeMap<String, u64>,
    /// How many times the sessions were sampled.
    pub(crate) samples: u64,
}

impl Window {
    fn empty_three() -> [Window; 3] {
        [(); 3].map(|()| Window {
            events: 0,
            errors: 0,
            latency: new_histogram(),
            waits: BTreeMap::new(),
            samples: 0,
        })
    }
}

struct State {
    load_started: Instant,
    erasure_started: Option<Instant>,
    erasure_completed: Option<Instant>,
    load_ended: Option<Instant>,
    windows: [Window; 3],
}

/// Shared by the load loop, the session sampler and the run that moves the boundaries.
#[derive(Clone)]
pub(crate) struct Timeline(Arc<Mutex<State>>);

impl Timeline {
    pub(crate) fn new(load_started: Instant) -> Self {
        Self(Arc::new(Mutex::new(State {
            load_started,
            erasure_started: None,
            erasure_completed: None,
            load_ended: None,
            windows: Window::empty_three(),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("timeline lock")
    }

    pub(crate) fn erasure_started(&self, at: Instant) {
        self.state().erasure_started = Some(at);
    }

    pub(crate) fn erasure_completed(&self, at: Instant) {
        self.state().erasure_completed = Some(at);
    }

    pub(crate) fn load_ended(&self, at: Instant) {
        self.state().load_ended = Some(at);
    }

    /// The window `at` falls in.
    fn window_of(state: &State, at: Instant) -> usize {
        match (state.erasure_started, state.erasure_completed) {
            (Some(started), _) if at < started => 0,
            (None, _) => 0,
            (Some(_), Some(completed)) if at >= completed => 2,
            (Some(_), _) => 1,
        }
    }

    /// Counts one call of the load loop.
    pub(crate) fn record(&self, scheduled: Instant, outcome: PacedOutcome) {
        let mut state = self.state();
        let index = Self::window_of(&state, scheduled);
        let window = &mut state.windows[index];
        match outcome {
            Ok((events, latency)) => {
                window.events += events;
                window.latency.saturating_record(latency);
            }
            Err(()) => window.errors += 1,
        }
    }

    /// Counts one sample of the active sessions, taken at `at`.
    pub(crate) fn record_sessions(&self, at: Instant, waits: Vec<(String, i64)>) {
        let mut state = self.state();
        let index = Self::window_of(&state, at);
        let window = &mut state.windows[index];
        window.samples += 1;
        for (wait, sessions) in waits {
            *window.waits.entry(wait).or_default() += sessions as u64;
        }
    }

    /// The windows with their lengths in seconds (what is recorded later is not in
    /// them); call once the load has ended.
    pub(crate) fn finish(&self) -> Vec<(f64, Window)> {
        let mut state = self.state();
        let windows = std::mem::replace(&mut state.windows, Window::empty_three());
        let ended = state.load_ended.unwrap_or_else(Instant::now);
        let started = state.erasure_started.unwrap_or(ended);
        let completed = state.erasure_completed.unwrap_or(ended);
        let bounds = [(state.load_started, started), (started, completed), (completed, ended)];
        bounds
            .into_iter()
            .zip(windows)
            .map(|((from, to), window)| (to.saturating_duration_since(from).as_secs_f64(), window))
            .collect()
    }
}

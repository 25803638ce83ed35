//! Users' histories in memory, keyed by the keyed hash of their id: training histories from
//! the model directory, then the feedback log replayed over them, then live feedback.

use std::collections::HashMap;

use crate::feedback::Record;
use crate::model::{Catalog, ModelData};
use crate::pgstore::UserRows;
use crate::privacy::{UserHash, UserKey};

/// One user's state.
#[derive(Debug, Clone, Default)]
pub struct UserState {
    /// Row of the user embedding / features; 0 for users the models never saw, and for
    /// forgotten users (their training row is personal data too).
    pub index: u32,
    /// Positive interactions `(item index, unix ms)`, oldest first: what the user tower reads.
    pub history: Vec<(u32, i64)>,
    /// Disliked items: never recommended again, not in the tower's history.
    pub hidden: Vec<u32>,
}

/// What the engine needs to know about whom it recommends for.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub user_index: u32,
    /// Item indices, oldest first.
    pub history: Vec<u32>,
    /// Items never to return: the history plus hidden items.
    pub exclude: Vec<u32>,
}

impl Subject {
    /// No history at all: cold start.
    pub fn is_cold(&self) -> bool {
        self.history.is_empty()
    }

    /// An anonymous visitor with recent items (oldest first).
    pub fn anonymous(recent: Vec<u32>) -> Self {
        Self {
            user_index: 0,
            exclude: recent.clone(),
            history: recent,
        }
    }
}

/// All users with any state.
#[derive(Debug, Default)]
pub struct Users {
    map: HashMap<UserHash, UserState>,
}

impl Users {
    /// Training users with their training histories, as users of `tenant`
    /// (`recommendation.training_tenant`).
    pub fn from_training(data: &ModelData, key: &UserKey, tenant: &str) -> Self {
        let mut map = HashMap::with_capacity(data.users.len());
        for (&user_id, &index) in &data.users {
            let history = data
                .histories
                .get(&index)
                .map(|h| {
                    h.iter()
                        .map(|&(i, ts)| (i, ts.saturating_mul(1000)))
                        .collect()
                })
                .unwrap_or_default();
            map.insert(
                key.hash_for(tenant, user_id),
                UserState {
                    index,
                    history,
                    hidden: Vec::new(),
                },
            );
        }
        Self { map }
    }

    /// Applies one log record. Feedback for an item the catalogue no longer has is skipped.
    /// Returns the user's history length afterwards.
    pub fn apply(&mut self, record: &Record, catalog: &Catalog) -> usize {
        match record {
            Record::Feedback {
                user,
                item_id,
                event,
                timestamp_ms,
            } => {
                let state = self.map.entry(*user).or_default();
                if let Some(idx) = catalog.index_of(*item_id) {
                    if event.is_positive() {
                        state.history.push((idx, *timestamp_ms));
                    } else if !state.hidden.contains(&idx) {
                        state.hidden.push(idx);
                    }
                }
                state.history.len()
            }
            Record::Forget { user } => {
                self.map.remove(user);
                0
            }
        }
    }

    /// Removes a user; returns how many history entries (positive and hidden) they had.
    pub fn forget(&mut self, user: UserHash) -> usize {
        self.map
            .remove(&user)
            .map(|s| s.history.len() + s.hidden.len())
            .unwrap_or(0)
    }

    /// The engine's view of a user; unknown users are cold start.
    pub fn subject(&self, user: UserHash) -> Subject {
        match self.map.get(&user) {
            None => Subject::default(),
            Some(s) => {
                let history: Vec<u32> = s.history.iter().map(|h| h.0).collect();
                let mut exclude = history.clone();
                exclude.extend_from_slice(&s.hidden);
                Subject {
                    user_index: s.index,
                    history,
                    exclude,
                }
            }
        }
    }

    /// The engine's view of a user whose feedback lives in the shared database: this version's
    /// training state (unless the user was forgotten), then `rows` applied in order, as the
    /// file store's replay would. Built per request; nothing of it is kept.
    pub fn subject_with(&self, user: UserHash, rows: &UserRows, catalog: &Catalog) -> Subject {
        let mut one = Users::default();
        if !rows.forgotten
            && let Some(s) = self.map.get(&user)
        {
            one.map.insert(user, s.clone());
        }
        for r in &rows.events {
            one.apply(r, catalog);
        }
        one.subject(user)
    }

    /// The user's positive history length in this version (training history, for the
    /// database store whose versions hold nothing else).
    pub fn history_len(&self, user: UserHash) -> usize {
        self.map.get(&user).map_or(0, |s| s.history.len())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedback::EventKind;

    fn catalog() -> Catalog {
        let mut c = Catalog {
            items: vec![Default::default(); 4],
            ..Catalog::default()
        };
        for i in 1..4u32 {
            c.by_id.insert(i as i64 * 10, i);
        }
        c
    }

    #[test]
    fn feedback_then_forget_is_cold_start() {
        let c = catalog();
        let mut users = Users::default();
        let u = UserHash([9; 16]);
        let fb = |item, event| Record::Feedback {
            user: u,
            item_id: item,
            event,
            timestamp_ms: 1,
        };
        assert_eq!(users.apply(&fb(10, EventKind::Watch), &c), 1);
        assert_eq!(users.apply(&fb(20, EventKind::Dislike), &c), 1);
        assert_eq!(
            users.apply(&fb(999, EventKind::Like), &c),
            1,
            "unknown item skipped"
        );
        let s = users.subject(u);
        assert_eq!(s.history, vec![1]);
        assert_eq!(s.exclude, vec![1, 2]);
        assert_eq!(users.forget(u), 2);
        let cold = users.subject(u);
        assert!(cold.is_cold() && cold.exclude.is_empty() && cold.user_index == 0);
    }

    #[test]
    fn database_rows_overlay_the_training_state_unless_forgotten() {
        let c = catalog();
        let u = UserHash([3; 16]);
        let mut training = Users::default();
        training.map.insert(
            u,
            UserState {
                index: 7,
                history: vec![(1, 0)],
                hidden: Vec::new(),
            },
        );
        let fb = |item, event| Record::Feedback {
            user: u,
            item_id: item,
            event,
            timestamp_ms: 1,
        };
        let mut rows = UserRows {
            events: vec![fb(20, EventKind::Like), fb(30, EventKind::Dislike)],
            forgotten: false,
        };
        let s = training.subject_with(u, &rows, &c);
        assert_eq!((s.user_index, s.history.clone()), (7, vec![1, 2]));
        assert_eq!(s.exclude, vec![1, 2, 3]);
        assert_eq!(
            training.history_len(u),
            1,
            "the version's users are not changed"
        );
        rows.forgotten = true;
        let s = training.subject_with(u, &rows, &c);
        assert_eq!(
            (s.user_index, s.history),
            (0, vec![2]),
            "training state dropped"
        );
    }
}

//! Identity on SQLite: the queries shared with the other backend.

crate::queries::identity::identity_queries!(crate::SqliteStore);

//! Store drivers (SQLite embedded default, Postgres at scale) behind `cochat_actors::ports::Store`.

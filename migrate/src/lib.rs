//! ferry-migrate: the migration engine (not built yet).

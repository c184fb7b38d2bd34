//! ferry-multichannel: sessions of many channels over many NICs.
//!
//! Not built yet. This crate will own interface discovery and exchange, pairing of interfaces that
//! reach each other, opening several authenticated channels per session, scheduling batches in
//! proportion to what each channel delivers, and resending a failed channel's unacknowledged
//! batches on the survivors (SMB3-multichannel style).

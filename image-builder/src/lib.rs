//! keel-image: builds and inspects Keel appliance disk images.

pub mod validate;

//! Tests of the protocol core and the driver.

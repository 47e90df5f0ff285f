//! ACPI PM1a event and control registers (the FADT's PM1a_EVT_BLK / PM1a_CNT_BLK).
//!
//! Declaring a full (not hardware-reduced) ACPI platform keeps Linux's legacy interrupt
//! setup (PIC, ISA IRQs 0-15 identity-mapped on the IOAPIC), which the 8250, i8042 and
//! RTC drivers need to get their IRQs; such a platform must have these registers. The
//! system is always in ACPI mode (SCI_EN reads 1, there is no SMI command port). A
//! sleep request (SLP_EN) can only mean S5 here, as no other sleep state exists, so it
//! powers the VM off.
//!
//! The fixed-feature power button lives here too: pressing it sets PWRBTN_STS and, when
//! the guest enabled PWRBTN_EN (Linux's ACPI button driver does), raises the SCI. The
//! guest acknowledges by writing 1 to the status bit.
//!
//! Saved state ([`AcpiPmState`]) is the three registers; a press pending when the VM
//! was saved is delivered after the restore.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::control::{ExitReason, VmControl};
use crate::devices::IrqLine;
use crate::state_error::StateError;

/// Base I/O port: PM1a_EVT_BLK (status, enable) then PM1a_CNT_BLK.
pub const PM_BASE: u16 = 0x600;
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1_CNT_LEN: u8 = 2;
pub const PM_LEN: u64 = (PM1_EVT_LEN + PM1_CNT_LEN) as u64;
/// The SCI's ISA IRQ (raised for the power button).
pub const SCI_IRQ: u16 = 9;

const OFFSET_STATUS: u64 = 0;
const OFFSET_ENABLE: u64 = 2;
/// PM1 status/enable bit of the fixed-feature power button.
pub const PWRBTN: u16 = 1 << 8;
const OFFSET_CONTROL: u64 = 4;
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;

pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    vm: Arc<VmControl>,
    sci: IrqLine,
}

impl AcpiPm {
    pub fn new(vm: Arc<VmControl>, sci: IrqLine) -> Self {
        AcpiPm {
            status: 0,
            enable: 0,
            control: SCI_EN,
            vm,
            sci,
        }
    }

    pub fn sci(&self) -> &IrqLine {
        &self.sci
    }

    /// True when the guest's OS listens to the power button (it set PWRBTN_EN).
    pub fn power_button_armed(&self) -> bool {
        self.enable & PWRBTN != 0
    }

    /// Presses the power button: PWRBTN_STS is set, and the SCI raised if enabled.
    /// Returns whether the guest had it enabled.
    pub fn press_power_button(&mut self) -> bool {
        self.status |= PWRBTN;
        self.update_sci()
    }

    /// Raises the SCI while an enabled event is pending. Returns whether it did.
    fn update_sci(&self) -> bool {
        if self.status & self.enable == 0 {
            return false;
        }
        if let Err(e) = self.sci.pulse() {
            tracing::warn!("ACPI SCI: {e}");
        }
        true
    }

    fn register(&self, offset: u64) -> u16 {
        match offset {
            OFFSET_STATUS => self.status,
            OFFSET_ENABLE => self.enable,
            OFFSET_CONTROL => self.control | SCI_EN,
            _ => 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Byte and word accesses at any offset: read the 16-bit registers as bytes.
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let reg = self.register(at & !1);
            *byte = reg.to_le_bytes()[(at & 1) as usize];
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            let shift = 8 * (at & 1) as u16;
            let mask = !(0xffu16 << shift);
            let value = u16::from(byte) << shift;
            match at & !1 {
                // Write one to clear.
                OFFSET_STATUS => self.status &= !value,
                OFFSET_ENABLE => {
                    self.enable = (self.enable & mask) | value;
                    // An event that was pending before it was enabled fires now.
                    self.update_sci();
                }
                OFFSET_CONTROL => {
                    self.control = (self.control & mask) | value;
                    if self.control & SLP_EN != 0 {
                        self.control &= !SLP_EN;
                        tracing::debug!("ACPI sleep request: powering off");
                        self.vm.request_exit(ExitReason::PowerOff);
                    }
                }
                _ => {}
            }
        }
    }
}

/// The three PM1 registers as the guest left them. Whether the power button is armed
/// is PWRBTN_EN in `enable`; a press the guest has not acknowledged is PWRBTN_STS in
/// `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcpiPmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

impl AcpiPm {
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
        }
    }

    /// Puts the registers back. An enabled event still pending (a power-button press
    /// not yet acknowledged) raises the SCI again: the guest's handler reads PM1 status
    /// and finds it, or finds it handled already and ignores the interrupt.
    pub fn restore(&mut self, state: &AcpiPmState) -> Result<(), StateError> {
        let invalid = |reason: String| StateError::Invalid {
            what: "ACPI PM",
            reason,
        };
        // The device sets no status bit but the power button's.
        if state.status & !PWRBTN != 0 {
            return Err(invalid(format!(
                "PM1 status {:#x}: only the power button ({PWRBTN:#x}) is ever set",
                state.status
            )));
        }
        // SLP_EN is acted on and cleared within the write that sets it.
        if state.control & SLP_EN != 0 {
            return Err(invalid(format!("PM1 control {:#x} holds SLP_EN", state.control)));
        }
        self.status = state.status;
        self.enable = state.enable;
        self.control = state.control;
        self.update_sci();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sci_enabled_and_sleep_powers_off() {
        let vm = Arc::new(VmControl::new().unwrap());
        let mut pm = AcpiPm::new(vm.clone(), IrqLine::new(9).unwrap());
        let mut word = [0u8; 2];
        pm.read(OFFSET_CONTROL, &mut word);
        assert_eq!(u16::from_le_bytes(word) & SCI_EN, SCI_EN);
        pm.write(OFFSET_ENABLE, &0x0120u16.to_le_bytes());
        pm.read(OFFSET_ENABLE, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x0120);
        assert!(!vm.is_stopping());
        pm.write(OFFSET_CONTROL, &(SLP_EN | (5 << 10)).to_le_bytes());
        assert_eq!(vm.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled() {
        let vm = Arc::new(VmControl::new().unwrap());
        let mut pm = AcpiPm::new(vm.clone(), IrqLine::new(9).unwrap());
        assert!(!pm.power_button_armed());
        assert!(!pm.press_power_button(), "not enabled yet");
        assert!(pm.sci().eventfd().read().is_err(), "no SCI");
        let mut word = [0u8; 2];
        pm.read(OFFSET_STATUS, &mut word);
        assert_eq!(u16::from_le_bytes(word), PWRBTN, "status set anyway");
        // Enabling with the event pending raises the SCI at once.
        pm.write(OFFSET_ENABLE, &PWRBTN.to_le_bytes());
        assert!(pm.power_button_armed());
        assert_eq!(pm.sci().eventfd().read().unwrap(), 1);
        // The guest acknowledges (write one to clear); the next press raises it again.
        pm.write(OFFSET_STATUS, &PWRBTN.to_le_bytes());
        pm.read(OFFSET_STATUS, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0);
        assert!(pm.press_power_button());
        assert_eq!(pm.sci().eventfd().read().unwrap(), 1);
        assert!(!vm.is_stopping());
    }

    fn fresh() -> AcpiPm {
        AcpiPm::new(Arc::new(VmControl::new().unwrap()), IrqLine::new(9).unwrap())
    }

    fn reg(pm: &mut AcpiPm, offset: u64) -> u16 {
        let mut word = [0u8; 2];
        pm.read(offset, &mut word);
        u16::from_le_bytes(word)
    }

    /// Power button armed and pressed (not acknowledged), a GPE-style enable bit and
    /// SLP_TYP bits written.
    fn pressed() -> AcpiPm {
        let mut pm = fresh();
        pm.write(OFFSET_ENABLE, &(PWRBTN | 0x20).to_le_bytes());
        pm.write(OFFSET_CONTROL, &(SCI_EN | 5 << 10).to_le_bytes());
        assert!(pm.press_power_button());
        pm
    }

    #[test]
    fn restored_pm_keeps_registers_and_delivers_a_pending_press() {
        let saved = pressed().state();
        let mut pm = fresh();
        pm.restore(&saved).unwrap();
        assert_eq!(
            pm.sci().eventfd().read().unwrap(),
            1,
            "the pending press raises the SCI"
        );
        assert!(pm.power_button_armed());
        assert_eq!(reg(&mut pm, OFFSET_STATUS), PWRBTN);
        assert_eq!(reg(&mut pm, OFFSET_ENABLE), PWRBTN | 0x20);
        assert_eq!(reg(&mut pm, OFFSET_CONTROL), SCI_EN | 5 << 10);
        pm.write(OFFSET_STATUS, &PWRBTN.to_le_bytes());
        assert_eq!(reg(&mut pm, OFFSET_STATUS), 0, "acknowledged");
        assert!(pm.press_power_button());

        // Nothing pending: no SCI on restore.
        let mut quiet = fresh();
        quiet.restore(&AcpiPmState { status: 0, ..saved }).unwrap();
        assert!(quiet.sci().eventfd().read().is_err());
        assert!(quiet.power_button_armed());
    }

    #[test]
    fn state_round_trips_through_json() {
        let saved = pressed().state();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<AcpiPmState>(&json).unwrap(), saved);
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut pm = fresh();
        for bad in [
            AcpiPmState {
                status: 1,
                enable: 0,
                control: SCI_EN,
            },
            AcpiPmState {
                status: 0,
                enable: 0,
                control: SLP_EN | SCI_EN,
            },
        ] {
            assert!(matches!(
                pm.restore(&bad),
                Err(StateError::Invalid { what: "ACPI PM", .. })
            ));
        }
        assert_eq!(
            pm.state(),
            AcpiPmState {
                status: 0,
                enable: 0,
                control: SCI_EN
            }
        );
    }
}

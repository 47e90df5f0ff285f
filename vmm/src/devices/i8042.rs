//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).
//!
//! Two jobs: the reset line (command 0xFE, how Linux reboots with `reboot=k`) ends the VM
//! with the reboot exit code, and Ctrl-Alt-Del can be typed into the guest so SIGTERM
//! asks it to shut down. To make the second one work the guest's i8042 and atkbd drivers
//! must attach, so the controller answers the probe commands Linux sends (self tests,
//! command byte, keyboard identify). Answering every command that expects a reply
//! matters: a missing reply costs the guest a half-second timeout per command. There is
//! no mouse: the AUX port answers its loopback test but NAKs every byte sent to it.
//!
//! vm-superio's `I8042Device` only implements the reset command, hence this device.
//!
//! Saved state ([`I8042State`]) is the controller's side of the conversation: command
//! byte, unread output and half-done commands, so a guest saved mid-probe or mid-key
//! sequence carries on where it was.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::control::{ExitReason, VmControl};
use crate::devices::IrqLine;
use crate::state_error::StateError;

/// Base port; the device claims 0x60..=0x64 and answers offsets 0 and 4 (0x61 is
/// KVM's in-kernel speaker port and never reaches us).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
pub const KBD_IRQ: u32 = 1;
pub const AUX_IRQ: u32 = 12;

const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

// Status register bits.
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
/// Set = keyboard not inhibited by the key lock.
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUXDATA: u8 = 0x20;

// Controller configuration byte ("command byte") bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_AUXINT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT: u8 = 0xc0;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET: u8 = 0xfe;

// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_NAK: u8 = 0xfe;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Bytes the controller holds for the guest; real ones hold one, a few more lets a
/// whole key sequence be queued at once.
const BUFFER_LIMIT: usize = 16;

/// Ctrl, Alt, Del pressed, then released: scan code set 1 (what the guest sees when the
/// controller translates, the Linux default) and set 2 (untranslated).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

pub struct I8042 {
    ctr: u8,
    /// Pending output bytes; `true` marks AUX (mouse) data.
    output: VecDeque<(u8, bool)>,
    /// Last byte handed out, returned again when the buffer is read empty.
    last: u8,
    /// Controller command waiting for its data byte.
    pending_command: Option<u8>,
    /// Keyboard command waiting for its parameter byte.
    pending_kbd_command: Option<u8>,
    /// Whether the last write went to the command port (status bit 3).
    last_write_was_command: bool,
    kbd_irq: IrqLine,
    aux_irq: IrqLine,
    control: Arc<VmControl>,
}

impl I8042 {
    pub fn new(kbd_irq: IrqLine, aux_irq: IrqLine, control: Arc<VmControl>) -> Self {
        I8042 {
            // What a BIOS leaves behind: keyboard interrupt on, POST passed, translation.
            ctr: CTR_KBDINT | CTR_SYS | CTR_XLATE,
            output: VecDeque::new(),
            last: 0,
            pending_command: None,
            pending_kbd_command: None,
            last_write_was_command: false,
            kbd_irq,
            aux_irq,
            control,
        }
    }

    pub fn kbd_irq(&self) -> &IrqLine {
        &self.kbd_irq
    }

    pub fn aux_irq(&self) -> &IrqLine {
        &self.aux_irq
    }

    /// Types Ctrl-Alt-Del: how a guest is asked to shut down or reboot.
    pub fn inject_ctrl_alt_del(&mut self) {
        if self.ctr & CTR_XLATE != 0 {
            CTRL_ALT_DEL_SET1.iter().for_each(|&b| self.push(b, false));
        } else {
            CTRL_ALT_DEL_SET2.iter().for_each(|&b| self.push(b, false));
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if let Some(&(_, aux)) = self.output.front() {
            s |= STATUS_OBF;
            if aux {
                s |= STATUS_AUXDATA;
            }
        }
        if self.ctr & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_write_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.output.len() >= BUFFER_LIMIT {
            return;
        }
        self.output.push_back((byte, aux));
        if self.output.len() == 1 {
            self.raise_irq_for_head();
        }
    }

    /// One interrupt per byte that reaches the head of the buffer, if the guest enabled
    /// interrupts for that port.
    fn raise_irq_for_head(&self) {
        let Some(&(_, aux)) = self.output.front() else {
            return;
        };
        let (enabled, line) = if aux {
            (self.ctr & CTR_AUXINT != 0, &self.aux_irq)
        } else {
            (self.ctr & CTR_KBDINT != 0, &self.kbd_irq)
        };
        if enabled && let Err(e) = line.pulse() {
            tracing::warn!("i8042: cannot raise IRQ {}: {e}", line.gsi());
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.output.pop_front() {
            self.last = byte;
            self.raise_irq_for_head();
        }
        self.last
    }

    fn command(&mut self, cmd: u8) {
        self.pending_command = None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, false),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT | CMD_WRITE_KBD_BUFFER | CMD_WRITE_AUX_BUFFER | CMD_WRITE_AUX => {
                self.pending_command = Some(cmd)
            }
            CMD_AUX_DISABLE => self.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUXDIS,
            CMD_AUX_TEST | CMD_KBD_TEST => self.push(0x00, false),
            CMD_SELF_TEST => self.push(0x55, false),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBDDIS,
            CMD_READ_INPUT => self.push(0x00, false),
            // Output port: bit 0 = not in reset, bit 1 = A20 enabled.
            CMD_READ_OUTPUT => self.push(0x03, false),
            // 0xF0..=0xFF pulse output port lines low; bit 0 low pulses CPU reset, and
            // 0xFE is the usual way to ask for it.
            c if c == CMD_RESET || (c >= 0xf0 && c & 1 == 0) => {
                tracing::debug!("i8042: reset command {c:#x}");
                self.control.request_exit(ExitReason::Reboot);
            }
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTPUT) => {
                if value & 1 == 0 {
                    self.control.request_exit(ExitReason::Reboot);
                }
            }
            Some(CMD_WRITE_KBD_BUFFER) => self.push(value, false),
            Some(CMD_WRITE_AUX_BUFFER) => self.push(value, true),
            // No mouse behind the AUX port: refuse whatever is sent to it.
            Some(CMD_WRITE_AUX) => self.push(KBD_NAK, true),
            _ => self.keyboard(value),
        }
    }

    /// A byte sent to the keyboard itself.
    fn keyboard(&mut self, value: u8) {
        if let Some(cmd) = self.pending_kbd_command.take() {
            self.push(KBD_ACK, false);
            // "Get scan code set" (0xF0 with parameter 0) answers the current set.
            if cmd == 0xf0 && value == 0 {
                self.push(0x02, false);
            }
            return;
        }
        match value {
            0xff => {
                self.push(KBD_ACK, false);
                self.push(KBD_SELF_TEST_OK, false);
            }
            // Identify: an MF2 keyboard.
            0xf2 => {
                self.push(KBD_ACK, false);
                self.push(0xab, false);
                self.push(0x83, false);
            }
            0xee => self.push(0xee, false),
            // Set LEDs, scan code set, typematic rate: a parameter byte follows.
            0xed | 0xf0 | 0xf3 => {
                self.pending_kbd_command = Some(value);
                self.push(KBD_ACK, false);
            }
            _ => self.push(KBD_ACK, false),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_DATA => self.read_data(),
            OFFSET_COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            OFFSET_DATA => {
                self.last_write_was_command = false;
                self.data(value);
            }
            OFFSET_COMMAND => {
                self.last_write_was_command = true;
                self.command(value);
            }
            _ => {}
        }
    }
}

/// One byte waiting in the controller's output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042Byte {
    pub byte: u8,
    /// AUX (mouse) data rather than keyboard data: sets status bit 5 and goes out on
    /// IRQ 12.
    pub aux: bool,
}

/// Everything that decides what the controller answers next: the command byte, the
/// output buffer, the byte a read of an empty buffer repeats, half-done commands and
/// the status register's "last write was a command" bit. The rest of the status
/// register is derived from these. The reset line has no state: a reset request ends
/// the VM at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// The controller configuration ("command") byte.
    pub command_byte: u8,
    /// Bytes not read yet, head first; at most 16.
    pub output: Vec<I8042Byte>,
    pub last_read: u8,
    /// A controller command waiting for its data byte (0x60, 0xd1..=0xd4).
    pub pending_command: Option<u8>,
    /// A keyboard command waiting for its parameter (0xed, 0xf0, 0xf3).
    pub pending_kbd_command: Option<u8>,
    pub last_write_was_command: bool,
}

/// Controller commands that take a data byte: the only ones `pending_command` holds.
const DATA_COMMANDS: [u8; 5] = [
    CMD_WRITE_CTR,
    CMD_WRITE_OUTPUT,
    CMD_WRITE_KBD_BUFFER,
    CMD_WRITE_AUX_BUFFER,
    CMD_WRITE_AUX,
];
/// Keyboard commands that take a parameter byte.
const KBD_PARAMETER_COMMANDS: [u8; 3] = [0xed, 0xf0, 0xf3];

impl I8042 {
    pub fn state(&self) -> I8042State {
        I8042State {
            command_byte: self.ctr,
            output: self.output.iter().map(|&(byte, aux)| I8042Byte { byte, aux }).collect(),
            last_read: self.last,
            pending_command: self.pending_command,
            pending_kbd_command: self.pending_kbd_command,
            last_write_was_command: self.last_write_was_command,
        }
    }

    /// Puts the controller back. With bytes waiting, the interrupt for the head byte is
    /// raised again (if enabled): the irqchip's own state is restored too, so this is
    /// usually a duplicate, which Linux's driver ignores (it reads the status register
    /// first and finds one byte per interrupt at most); raising it keeps the restore
    /// from depending on whether the irqchip had latched the edge.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        let invalid = |reason: String| StateError::Invalid { what: "i8042", reason };
        if state.output.len() > BUFFER_LIMIT {
            return Err(invalid(format!(
                "{} bytes in the output buffer, which holds {BUFFER_LIMIT}",
                state.output.len()
            )));
        }
        if let Some(cmd) = state.pending_command.filter(|c| !DATA_COMMANDS.contains(c)) {
            return Err(invalid(format!("controller command {cmd:#x} takes no data byte")));
        }
        if let Some(cmd) = state
            .pending_kbd_command
            .filter(|c| !KBD_PARAMETER_COMMANDS.contains(c))
        {
            return Err(invalid(format!("keyboard command {cmd:#x} takes no parameter")));
        }
        self.ctr = state.command_byte;
        self.output = state.output.iter().map(|b| (b.byte, b.aux)).collect();
        self.last = state.last_read;
        self.pending_command = state.pending_command;
        self.pending_kbd_command = state.pending_kbd_command;
        self.last_write_was_command = state.last_write_was_command;
        self.raise_irq_for_head();
        Ok(())
    }
}

#[cfg(test)]
mod tests;

import type { Command } from "commander";
import { paceCommandFor } from "./pause.js";

/** pgshift resume <table>: lets a paused backfill or verify go on (built with pause: src/cli/pause.ts). */
export function resumeCommand(): Command {
  return paceCommandFor("resume");
}

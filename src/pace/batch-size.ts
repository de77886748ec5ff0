/**
 * Batches sized by time: the row count of the next batch follows the measured duration of the recent ones, so
 * that a batch (which holds its source rows locked FOR SHARE until it commits) lasts about `targetMs`, and an
 * application write that meets its row locks waits at most about that long.
 */

/** Settings of a BatchSizer. */
export interface BatchSizeOptions {
  /** Target duration of one batch, ms (> 0). */
  targetMs: number;
  /** The most rows a batch may hold (--batch-size); also the first batch's size unless `startRows` is given. */
  maxRows: number;
  /** The fewest rows a batch holds, however slow (default 100, or maxRows when smaller). */
  minRows?: number;
  /** The first batch's size (a size kept from an earlier run), clamped to [minRows, maxRows]. */
  startRows?: number;
}

/** A batch may grow by at most this factor over the one before it. */
export const MAX_GROWTH = 1.5;
/** A batch may shrink to no less than this fraction of the one before it (shrinking fast keeps waits short). */
export const MAX_SHRINK = 0.25;

/**
 * Picks each batch's row count from the durations of the batches before it: the time per row is a moving
 * average of the recent batches (half weight to the newest), except that a batch that overran the target counts
 * at once in full (a slow server shrinks the next batch without delay). The next size is the target over the time
 * per row, moved by at most x1.5 up and x0.25 down from the current size, within [minRows, maxRows].
 */
export class BatchSizer {
  readonly targetMs: number;
  readonly maxRows: number;
  readonly minRows: number;
  private current: number;
  private msPerRow: number | null = null;

  constructor(opts: BatchSizeOptions) {
    this.targetMs = opts.targetMs;
    this.maxRows = Math.max(1, Math.floor(opts.maxRows));
    this.minRows = Math.max(1, Math.min(this.maxRows, Math.floor(opts.minRows ?? 100)));
    this.current = this.clamp(opts.startRows ?? this.maxRows);
  }

  /** Rows the next batch asks for. */
  get rows(): number {
    return this.current;
  }

  /**
   * Takes the measured duration of a batch of `rows` rows that took `ms` ms, and sets the next size.
   * A batch of fewer rows than asked for (the last one) or of none changes nothing.
   */
  observe(rows: number, ms: number): number {
    if (rows <= 0 || rows < this.current * 0.5 || !Number.isFinite(ms)) return this.current;
    const perRow = Math.max(ms, 0.01) / rows;
    this.msPerRow =
      this.msPerRow === null || ms > this.targetMs ? perRow : Math.max(perRow, 0.5 * this.msPerRow + 0.5 * perRow);
    const ideal = this.targetMs / this.msPerRow;
    const bounded = Math.min(this.current * MAX_GROWTH, Math.max(this.current * MAX_SHRINK, ideal));
    this.current = this.clamp(bounded);
    return this.current;
  }

  private clamp(n: number): number {
    return Math.max(this.minRows, Math.min(this.maxRows, Math.round(n)));
  }
}

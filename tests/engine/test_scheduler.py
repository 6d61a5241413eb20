from mistral_serve.engine.block_manager import BlockManager
from mistral_serve.engine.params import SamplingParams
from mistral_serve.engine.scheduler import Scheduler
from mistral_serve.engine.sequence import Sequence, SequenceFinish, SequenceStatus

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     eos_token_ids=frozenset({EOS})), bm


def make_seq(num_prompt, request_id="r", max_tokens=None, start=10, **params):
    return Sequence(request_id, 0, list(range(start, start + num_prompt)),
                    SamplingParams(max_tokens=max_tokens, **params), max_total_tokens=1000)


def run_step(scheduler, token=7):
    batch = scheduler.schedule()
    scheduler.postprocess(batch, [token if item.samples_token else None for item in batch])
    return batch


def test_long_prompt_is_prefilled_in_chunks_while_a_running_sequence_keeps_decoding():
    scheduler, _ = make_scheduler(max_num_batched_tokens=16)
    short = make_seq(3, "short")
    scheduler.add(short)
    run_step(scheduler)  # short is prefilled and samples its first token
    long = make_seq(40, "long", start=100)
    scheduler.add(long)
    chunks = []
    while long.is_prefilling or long.num_output_tokens == 0:
        batch = run_step(scheduler)
        by_id = {item.seq.request_id: item for item in batch}
        assert by_id["short"].num_new_tokens == 1  # the stream keeps flowing
        assert sum(item.num_new_tokens for item in batch) <= 16
        chunks.append(by_id["long"].num_new_tokens)
    assert chunks == [15, 15, 10]
    assert long.num_output_tokens == 1


def test_max_num_seqs_caps_the_running_set():
    scheduler, _ = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add(make_seq(2, f"r{i}", start=10 * i + 10))
    batch = scheduler.schedule()
    assert [item.seq.request_id for item in batch] == ["r0", "r1"]


def test_sequences_stop_at_eos_stop_token_and_max_tokens():
    scheduler, bm = make_scheduler()
    eos = make_seq(2, "eos")
    stop = make_seq(2, "stop", start=20, stop_token_ids=(5,))
    length = make_seq(2, "len", start=30, max_tokens=3)
    for seq in (eos, stop, length):
        scheduler.add(seq)
    batch = scheduler.schedule()
    tokens = {"eos": EOS, "stop": 5, "len": 8}
    scheduler.postprocess(batch, [tokens[item.seq.request_id] for item in batch])
    assert eos.finish_reason is SequenceFinish.STOP and stop.finish_reason is SequenceFinish.STOP
    assert length.finish_reason is None
    run_step(scheduler)
    run_step(scheduler)
    assert length.finish_reason is SequenceFinish.LENGTH and length.num_output_tokens == 3
    assert bm.num_free_blocks == bm.num_blocks


def test_ignore_eos_keeps_going():
    scheduler, _ = make_scheduler()
    seq = make_seq(2, ignore_eos=True, max_tokens=2)
    scheduler.add(seq)
    run_step(scheduler, token=EOS)
    assert not seq.is_finished
    run_step(scheduler, token=EOS)
    assert seq.finish_reason is SequenceFinish.LENGTH


def test_preemption_when_blocks_run_out_then_everything_finishes():
    # 6 blocks of 4 slots: three sequences cannot all grow to 12 tokens
    scheduler, bm = make_scheduler(num_blocks=6, block_size=4)
    seqs = [make_seq(4, f"r{i}", max_tokens=8, start=10 * i + 10) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    preempted = False
    for _ in range(200):
        if not scheduler.num_unfinished:
            break
        run_step(scheduler)
        preempted |= any(seq.num_preemptions for seq in seqs)
        assert bm.num_used_blocks <= 6
    assert preempted
    assert all(seq.finish_reason is SequenceFinish.LENGTH and seq.num_output_tokens == 8 for seq in seqs)
    assert bm.num_free_blocks == 6


def test_a_repeated_prompt_reports_its_cached_tokens():
    scheduler, _ = make_scheduler()
    first = make_seq(10, "a", max_tokens=1)
    scheduler.add(first)
    run_step(scheduler)
    assert first.is_finished and first.num_cached_tokens == 0
    second = make_seq(10, "b", max_tokens=1)
    scheduler.add(second)
    batch = run_step(scheduler)
    assert second.num_cached_tokens == 8  # two full blocks of four
    assert batch[0].num_new_tokens == 2


def test_siblings_of_an_n_request_wait_for_the_leader_prompt_and_share_it():
    scheduler, bm = make_scheduler(max_num_batched_tokens=64)
    params = SamplingParams(n=2, max_tokens=5)
    leader = Sequence("r", 0, list(range(10, 22)), params, 1000)
    sibling = Sequence("r", 1, list(range(10, 22)), params, 1000, leader=leader)
    scheduler.add(leader)
    scheduler.add(sibling)
    first = scheduler.schedule()
    assert [item.seq for item in first] == [leader]
    scheduler.postprocess(first, [7])
    second = run_step(scheduler)
    assert sibling in [item.seq for item in second]
    assert sibling.num_cached_tokens == 8
    assert sibling.block_table[:2] == leader.block_table[:2]


def test_finish_frees_a_waiting_or_running_sequence():
    scheduler, bm = make_scheduler()
    running, waiting = make_seq(3, "a"), make_seq(3, "b", start=50)
    scheduler.add(running)
    run_step(scheduler)
    scheduler.add(waiting)
    scheduler.finish(running, SequenceFinish.ABORT)
    scheduler.finish(waiting, SequenceFinish.ABORT)
    assert running.status is SequenceStatus.FINISHED and waiting.status is SequenceStatus.FINISHED
    assert scheduler.num_unfinished == 0 and bm.num_free_blocks == bm.num_blocks


def test_a_tenant_with_many_waiting_requests_cannot_starve_one_with_a_single_request():
    scheduler, _ = make_scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    flood = [make_seq(4, f"flood-{i}", max_tokens=3, start=10 + i) for i in range(8)]
    for seq in flood:
        seq.tenant = "flooder"
        scheduler.add(seq)
    admitted = [item.seq.request_id for item in run_step(scheduler)]  # the flooder's oldest runs
    polite = make_seq(4, "polite", max_tokens=3, start=50)
    polite.tenant = "polite"
    scheduler.add(polite)  # behind six of the flooder's
    while scheduler.num_unfinished:
        admitted += [item.seq.request_id for item in run_step(scheduler)
                     if item.start_position == 0 and item.seq.request_id not in admitted]
    # the slot that frees goes to the tenant served longest ago, then turns alternate
    assert admitted[:3] == ["flood-0", "polite", "flood-1"]


def test_an_account_spreading_its_requests_over_many_keys_takes_no_more_turns_than_one_with_one_key():
    scheduler, _ = make_scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    for i in range(8):  # account 1 floods through eight keys
        seq = make_seq(4, f"spread-{i}", max_tokens=3, start=10 + i)
        seq.tenant = f"1/{100 + i}"
        scheduler.add(seq)
    admitted = [item.seq.request_id for item in run_step(scheduler)]
    for i in range(2):  # account 2 sends two requests on one key
        seq = make_seq(4, f"single-{i}", max_tokens=3, start=50 + i)
        seq.tenant = "2/200"
        scheduler.add(seq)
    while scheduler.num_unfinished:
        admitted += [item.seq.request_id for item in run_step(scheduler)
                     if item.start_position == 0 and item.seq.request_id not in admitted]
    # turns alternate between the accounts, not between the nine keys
    assert admitted[:5] == ["spread-0", "single-0", "spread-1", "single-1", "spread-2"]


def test_within_one_tenant_requests_are_admitted_in_arrival_order():
    scheduler, _ = make_scheduler(max_num_seqs=1)
    for i in range(4):
        scheduler.add(make_seq(4, f"r{i}", max_tokens=2, start=10 + i))
    order = []
    while scheduler.num_unfinished:
        order += [item.seq.request_id for item in run_step(scheduler) if item.start_position == 0]
    assert order == ["r0", "r1", "r2", "r3"]

Feature: Provisioning, handoff and supervision by pool-managerd
  pool-managerd starts a llama-server for each configured pool, hands it off to orchestratord
  with a handoff file in the shared runtime directory, and restarts an engine that dies without
  disturbing the other pools.

  Background:
    Given a HOME stack with the pools:
      | pool | slots | model | ctx  |
      | p0   | 1     | tiny  | 2048 |
      | p1   | 1     | tiny  | 2048 |

  @POOL-3103 @POOL-3201
  Scenario: pool-managerd provisions the engine and hands it off to orchestratord
    Then pool-managerd has written the handoff file of pool "p0" naming a live engine on loopback
    And the handoff file of pool "p0" names model "tiny", 1 slot, its context and the engine version
    And orchestratord lists pool "p0" as ready with 1 slot
    And a task of 8 tokens pinned to pool "p0" completes there

  @POOL-3105 @POOL-3202
  Scenario: A killed engine is restarted and its pool is ready again
    Given the engine of pool "p1" is noted
    When the engine of pool "p0" is killed
    Then pool-managerd reports pool "p0" not ready and its handoff file says "restarting", then ready again with restart count 1
    And the handoff file of pool "p0" names a new engine process
    And orchestratord lists pool "p0" as ready with 1 slot
    And a task of 8 tokens pinned to pool "p0" completes there
    And pool "p1" still runs the noted engine, ready and never restarted
